//! `kind: Route` documents: a host name (and an optional path prefix) served by the edge
//! routers, forwarded to a service's port, with TLS terminated at the edge, passed through, or
//! terminated and re-encrypted (OpenShift's routes).
//!
//! ```yaml
//! kind: Route
//! metadata: {name: shop}
//! spec:
//!   host: shop.apps.example.test
//!   path: /api              # optional prefix; default /
//!   service: web
//!   port: 8080              # a container port of the service, or its name
//!   tls: {termination: edge, secret: shop-cert}   # the secret's value: certificate chain + key, PEM
//!   redirect_http: true     # plain HTTP gets a 301 to https
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Kind, Metadata, SpecError, check_dns_label};

/// One `kind: Route` document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Always `Route`.
    pub kind: Kind,
    /// Name, namespace, labels.
    pub metadata: Metadata,
    /// What the edge serves.
    pub spec: RouteSpec,
}

/// `spec` of a route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// The host name clients ask for (HTTP `Host`, TLS SNI): lowercase DNS labels joined by dots.
    pub host: String,
    /// A path prefix (default `/`, every path); starts with `/`.
    #[serde(default = "root_path")]
    pub path: String,
    /// The service in the route's namespace.
    pub service: String,
    /// A container port of the service (a number), or the name of one.
    pub port: RoutePort,
    /// TLS; none: plain HTTP only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RouteTls>,
    /// With TLS, plain HTTP requests get a redirect to `https://` (301) instead of the service.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub redirect_http: bool,
}

fn root_path() -> String {
    "/".into()
}

/// `spec.port`: a number or a port name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RoutePort {
    /// A container port.
    Number(u16),
    /// The `name` of one of the service's ports.
    Name(String),
}

impl fmt::Display for RoutePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoutePort::Number(n) => write!(f, "{n}"),
            RoutePort::Name(s) => f.write_str(s),
        }
    }
}

/// `spec.tls`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTls {
    /// Where TLS ends.
    pub termination: Termination,
    /// `edge` and `reencrypt`: the secret (in the route's namespace) whose value holds the
    /// certificate chain and its private key, PEM. Not allowed with `passthrough`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// `spec.tls.termination`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Termination {
    /// The edge decrypts with the route's certificate and sends plain HTTP to the tasks.
    Edge,
    /// The edge forwards the TLS connection untouched to the tasks (chosen by SNI); the tasks
    /// hold the certificate.
    Passthrough,
    /// The edge decrypts with the route's certificate and opens a new TLS connection to the
    /// tasks.
    Reencrypt,
}

impl Termination {
    pub fn as_str(self) -> &'static str {
        match self {
            Termination::Edge => "edge",
            Termination::Passthrough => "passthrough",
            Termination::Reencrypt => "reencrypt",
        }
    }
}

/// Whether `host` is a host name a route may serve: 1-253 bytes of lowercase DNS labels
/// (letters, digits, `-`) joined by dots, at least two labels.
pub fn is_route_host(host: &str) -> bool {
    host.len() <= 253
        && host.split('.').count() >= 2
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Whether `host` is `domain` or a name under it.
pub fn host_under(host: &str, domain: &str) -> bool {
    host == domain || host.strip_suffix(domain).is_some_and(|rest| rest.ends_with('.'))
}

impl Route {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }

    /// JSON with every default filled in, to detect an unchanged re-apply.
    pub fn canonical_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"unserializable\":{:?}}}", e.to_string()))
    }

    /// Checks the values and their combinations.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.metadata.validate()?;
        let s = &self.spec;
        if !is_route_host(&s.host) {
            return Err(SpecError::invalid(
                "spec.host",
                format!(
                    "invalid host {:?}; allowed: a lowercase DNS name with at least two labels, such as \
                     \"shop.apps.example.test\"",
                    s.host
                ),
            ));
        }
        if !s.path.starts_with('/')
            || s.path.len() > 1024
            || s.path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'#' || b == b'?')
        {
            return Err(SpecError::invalid(
                "spec.path",
                format!("invalid path prefix {:?}; allowed: starts with '/', no spaces, '?' or '#'", s.path),
            ));
        }
        check_dns_label("spec.service", "service name", &s.service)?;
        match &s.port {
            RoutePort::Number(0) => return Err(SpecError::invalid("spec.port", "allowed: 1 to 65535, or a port name")),
            RoutePort::Number(_) => {}
            RoutePort::Name(n) if !super::is_port_name(n) => {
                return Err(SpecError::invalid(
                    "spec.port",
                    format!("invalid port {n:?}; allowed: a container port number or the name of a service port"),
                ));
            }
            RoutePort::Name(_) => {}
        }
        if let Some(tls) = &s.tls {
            match (tls.termination, &tls.secret) {
                (Termination::Passthrough, Some(_)) => {
                    return Err(SpecError::invalid(
                        "spec.tls.secret",
                        "termination `passthrough` sends TLS to the tasks untouched, so the edge holds no \
                         certificate; remove `secret`",
                    ));
                }
                (Termination::Passthrough, None) => {
                    if s.path != "/" {
                        return Err(SpecError::invalid(
                            "spec.path",
                            "termination `passthrough` routes by TLS server name only (the edge cannot see \
                             paths); remove `path`",
                        ));
                    }
                }
                (t, None) => {
                    return Err(SpecError::invalid(
                        "spec.tls.secret",
                        format!(
                            "termination `{}` needs `secret`: a secret whose value is the certificate chain and \
                             its private key, PEM (berth secret create NAME --from-file cert-and-key.pem)",
                            t.as_str()
                        ),
                    ));
                }
                (_, Some(name)) => check_dns_label("spec.tls.secret", "secret name", name)?,
            }
        } else if s.redirect_http {
            return Err(SpecError::invalid(
                "spec.redirect_http",
                "a redirect to https needs `tls`; add tls or remove redirect_http",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Document, parse_all};

    fn route(spec: &str) -> Result<Route, String> {
        let text = format!("kind: Route\nmetadata: {{name: r}}\nspec:\n{spec}");
        match parse_all(&text).map_err(|e| e.to_string())?.remove(0) {
            Document::Route(r) => Ok(r),
            _ => Err("not a route".into()),
        }
    }

    #[test]
    fn routes_parse_with_defaults() {
        let r = route("  host: shop.apps.example.test\n  service: web\n  port: 8080\n").unwrap();
        assert_eq!(r.spec.path, "/");
        assert_eq!(r.spec.port, RoutePort::Number(8080));
        let r = route(
            "  host: a.b\n  service: web\n  port: http\n  tls: {termination: edge, secret: c}\n  redirect_http: true\n",
        )
        .unwrap();
        assert_eq!(r.spec.port, RoutePort::Name("http".into()));
        assert_eq!(r.spec.tls.unwrap().termination, Termination::Edge);
    }

    #[test]
    fn bad_routes_say_what_is_wrong() {
        for (spec, want) in [
            ("  host: Shop.example\n  service: web\n  port: 80\n", "spec.host"),
            ("  host: localhost\n  service: web\n  port: 80\n", "at least two labels"),
            ("  host: a.b\n  path: api\n  service: web\n  port: 80\n", "spec.path"),
            ("  host: a.b\n  service: web\n  port: 0\n", "spec.port"),
            ("  host: a.b\n  service: web\n  port: 80\n  tls: {termination: edge}\n", "needs `secret`"),
            (
                "  host: a.b\n  service: web\n  port: 80\n  tls: {termination: passthrough, secret: s}\n",
                "remove `secret`",
            ),
            ("  host: a.b\n  path: /x\n  service: web\n  port: 80\n  tls: {termination: passthrough}\n", "paths"),
            ("  host: a.b\n  service: web\n  port: 80\n  redirect_http: true\n", "needs `tls`"),
            ("  host: a.b\n  service: web\n  port: 80\n  weight: 3\n", "unknown field `weight`"),
        ] {
            let err = route(spec).expect_err(spec);
            assert!(err.contains(want), "{spec}: {err}");
        }
    }

    #[test]
    fn hosts_under_a_domain() {
        assert!(host_under("shop.apps.example.test", "apps.example.test"));
        assert!(host_under("apps.example.test", "apps.example.test"));
        assert!(!host_under("evilapps.example.test", "apps.example.test"));
        assert!(!host_under("example.test", "apps.example.test"));
    }
}
