//! The client config file (`berth.toml`), endpoint resolution and client credentials.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};

use crate::{Global, client::Client};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Master endpoints, HOST:PORT.
    pub endpoints: Vec<String>,
    /// The cluster CA certificate (PEM). Relative paths are relative to this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// The admin client certificate and key (PEM), from `berth pki init`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

impl ClientConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut c: ClientConfig =
            toml::from_str(&text).with_context(|| format!("config file {} is not valid", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.ca_cert, &mut c.cert, &mut c.key].into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(c)
    }
}

/// The files a client authenticates with.
pub struct Credentials {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Credentials {
    pub fn tls(&self) -> Result<tonic::transport::ClientTlsConfig> {
        let read = |p: &Path, what: &str| {
            std::fs::read_to_string(p).with_context(|| format!("cannot read the {what} {}", p.display()))
        };
        let files = berth_pki::tls::TlsFiles {
            ca_pem: read(&self.ca_cert, "CA certificate")?,
            cert: berth_pki::CertifiedKey {
                cert_pem: read(&self.cert, "client certificate")?,
                key_pem: read(&self.key, "client key")?,
            },
        };
        Ok(berth_master::client_tls(&files))
    }
}

/// Endpoints from --endpoints / BERTH_ENDPOINTS, else from --config / BERTH_CONFIG; credentials
/// from --ca-cert/--cert/--key (or BERTH_CA_CERT/BERTH_CERT/BERTH_KEY), else from the config file.
pub fn client(g: &Global) -> Result<Client> {
    let file = g.config.as_deref().map(ClientConfig::load).transpose()?;
    let mut endpoints: Vec<String> =
        g.endpoints.iter().map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
    if endpoints.is_empty()
        && let Some(f) = &file
    {
        endpoints = f.endpoints.clone();
    }
    let pick = |flag: &Option<PathBuf>, from_file: Option<&PathBuf>| flag.clone().or_else(|| from_file.cloned());
    let creds = Credentials {
        ca_cert: pick(&g.ca_cert, file.as_ref().and_then(|f| f.ca_cert.as_ref())).ok_or_else(missing_creds)?,
        cert: pick(&g.cert, file.as_ref().and_then(|f| f.cert.as_ref())).ok_or_else(missing_creds)?,
        key: pick(&g.key, file.as_ref().and_then(|f| f.key.as_ref())).ok_or_else(missing_creds)?,
    };
    Client::new(endpoints, creds.tls()?)
}

fn missing_creds() -> anyhow::Error {
    anyhow!(
        "no client credentials: every connection to the masters is mutual TLS. Point --config/BERTH_CONFIG \
         at the berth.toml that `berth dev` writes, or pass --ca-cert, --cert and --key (the files \
         `berth pki init` writes: ca.crt, admin.crt, admin.key)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_refuses_unknown_fields() {
        let c = ClientConfig {
            endpoints: vec!["127.0.0.1:7001".into()],
            ca_cert: Some("pki/ca.crt".into()),
            cert: Some("pki/admin.crt".into()),
            key: Some("pki/admin.key".into()),
        };
        let text = toml::to_string(&c).unwrap();
        assert_eq!(toml::from_str::<ClientConfig>(&text).unwrap(), c);
        assert!(toml::from_str::<ClientConfig>("endpoints = []\nbogus = 1").is_err());
    }

    #[test]
    fn relative_paths_are_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("berth.toml");
        std::fs::write(&p, "endpoints = [\"127.0.0.1:1\"]\nca_cert = \"pki/ca.crt\"\n").unwrap();
        let c = ClientConfig::load(&p).unwrap();
        assert_eq!(c.ca_cert.unwrap(), dir.path().join("pki/ca.crt"));
    }
}
