//! The client config file (`berth.toml`) and endpoint resolution.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::{Global, client::Client};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Master endpoints, HOST:PORT.
    pub endpoints: Vec<String>,
}

impl ClientConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config file {} is not valid", path.display()))
    }
}

/// Endpoints from --endpoints / BERTH_ENDPOINTS, else from --config / BERTH_CONFIG.
pub fn client(g: &Global) -> Result<Client> {
    let endpoints: Vec<String> = g.endpoints.iter().map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
    if !endpoints.is_empty() {
        return Client::new(endpoints);
    }
    if let Some(path) = &g.config {
        return Client::new(ClientConfig::load(path)?.endpoints);
    }
    Client::new(vec![])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_refuses_unknown_fields() {
        let c = ClientConfig { endpoints: vec!["127.0.0.1:7001".into()] };
        let text = toml::to_string(&c).unwrap();
        assert_eq!(toml::from_str::<ClientConfig>(&text).unwrap(), c);
        assert!(toml::from_str::<ClientConfig>("endpoints = []\nbogus = 1").is_err());
    }
}
