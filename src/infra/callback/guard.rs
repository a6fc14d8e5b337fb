//! The guard every callback URL passes, and the HTTP client that enforces it.
//!
//! Reads callback settings; writes nothing. Guarantees:
//! - At registration, URLs that are not http(s), or whose host is a literal cloud-metadata,
//!   link-local, unspecified, broadcast or multicast address, are refused.
//! - At delivery every address the host resolves to is checked (inside the client's resolver,
//!   so the checked address is the one connected to): loopback and the ranges above are
//!   refused, private ranges too when `deny_private` is set; `allowed_nets` are allowed anyway.
//! - No redirects are followed and no proxy is used, so nothing bypasses the check.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::infra::settings::CallbackArgs;

/// Host names that reach cloud metadata services.
const METADATA_HOSTS: &[&str] = &["metadata.google.internal", "metadata", "instance-data"];

/// Why a callback URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackError {
    #[error("is not a valid URL")]
    Invalid,
    #[error("must use http or https")]
    Scheme,
    #[error("must name a host")]
    NoHost,
    #[error("points at {0}, which callbacks may not reach")]
    Forbidden(String),
}

/// Which addresses callbacks may reach.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    deny_private: bool,
    allowed_nets: Vec<IpNet>,
}

impl Guard {
    pub fn new(settings: &CallbackArgs) -> Self {
        Self { deny_private: settings.deny_private, allowed_nets: settings.allowed_nets.clone() }
    }

    /// The registration check: the URL's shape and literal hosts that are never right.
    pub fn check_registration(&self, url: &str) -> Result<reqwest::Url, CallbackError> {
        let parsed = reqwest::Url::parse(url).map_err(|_| CallbackError::Invalid)?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(CallbackError::Scheme);
        }
        match host(&parsed) {
            None => Err(CallbackError::NoHost),
            Some(Host::Name(name)) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                if METADATA_HOSTS.contains(&name.as_str()) {
                    return Err(CallbackError::Forbidden(format!("the metadata host {name}")));
                }
                Ok(parsed)
            }
            Some(Host::Ip(ip)) => self.check_literal(ip).map(|()| parsed),
        }
    }

    fn check_literal(&self, ip: IpAddr) -> Result<(), CallbackError> {
        if self.is_allowed_net(ip) {
            return Ok(());
        }
        match never_reachable(canonical(ip)) {
            Some(what) => Err(CallbackError::Forbidden(format!("{what} address {ip}"))),
            None => Ok(()),
        }
    }

    /// The delivery check for one resolved address.
    pub fn check_address(&self, ip: IpAddr) -> Result<(), CallbackError> {
        if self.is_allowed_net(ip) {
            return Ok(());
        }
        let ip = canonical(ip);
        if let Some(what) = never_reachable(ip) {
            return Err(CallbackError::Forbidden(format!("{what} address {ip}")));
        }
        if ip.is_loopback() {
            return Err(CallbackError::Forbidden(format!("the loopback address {ip}")));
        }
        if self.deny_private && is_private(ip) {
            return Err(CallbackError::Forbidden(format!("the private address {ip}")));
        }
        Ok(())
    }

    /// The delivery check for a URL, resolving a host name and checking every address, so that
    /// a refusal can be told apart from a connection failure. The client's resolver checks
    /// again when it connects (a name may resolve differently the second time).
    pub async fn check_resolved(&self, url: &reqwest::Url) -> Result<(), CallbackError> {
        match host(url) {
            None => Err(CallbackError::NoHost),
            Some(Host::Ip(ip)) => self.check_address(ip),
            Some(Host::Name(name)) => {
                let port = url.port_or_known_default().unwrap_or(80);
                // A name that does not resolve is a connection problem, reported by the client.
                let Ok(addresses) = tokio::net::lookup_host((name, port)).await else { return Ok(()) };
                for address in addresses {
                    self.check_address(address.ip())?;
                }
                Ok(())
            }
        }
    }

    fn is_allowed_net(&self, ip: IpAddr) -> bool {
        let canonical = canonical(ip);
        self.allowed_nets.iter().any(|net| net.contains(&ip) || net.contains(&canonical))
    }

    /// An HTTP client that checks every resolved address, follows no redirects and uses no
    /// proxy. Call once and share it.
    pub fn client(&self, timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
        install_crypto_provider();
        reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver { guard: self.clone() }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("event-service/", env!("CARGO_PKG_VERSION")))
            .build()
    }
}

enum Host<'a> {
    Name(&'a str),
    Ip(IpAddr),
}

fn host(url: &reqwest::Url) -> Option<Host<'_>> {
    let text = url.host_str().filter(|text| !text.is_empty())?;
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    Some(bare.parse().map_or(Host::Name(text), Host::Ip))
}

/// reqwest is built without a default TLS crypto provider (ring keeps the build free of C):
/// install ring once per process before building any HTTP client.
pub fn install_crypto_provider() {
    // Fails only when a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`) is judged as the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Addresses no callback may ever reach, whatever the settings; `None` for the others.
fn never_reachable(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            if v4 == Ipv4Addr::new(169, 254, 169, 254) || v4 == Ipv4Addr::new(100, 100, 100, 200) {
                Some("the cloud metadata")
            } else if v4.is_link_local() {
                Some("a link-local")
            } else if v4.is_unspecified() || v4.octets()[0] == 0 {
                Some("an unspecified")
            } else if v4.is_broadcast() {
                Some("the broadcast")
            } else if v4.is_multicast() {
                Some("a multicast")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
                Some("the cloud metadata")
            } else if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                Some("a link-local")
            } else if v6.is_unspecified() {
                Some("an unspecified")
            } else if v6.is_multicast() {
                Some("a multicast")
            } else {
                None
            }
        }
    }
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private() || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// Resolves with the system resolver, then refuses the host if any address is refused.
struct GuardedResolver {
    guard: Guard,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.guard.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            for address in &addresses {
                guard.check_address(address.ip()).map_err(|error| format!("callback host {host} {error}"))?;
            }
            let addresses: Addrs = Box::new(addresses.into_iter());
            Ok(addresses)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(deny_private: bool, allowed: &[&str]) -> Guard {
        Guard { deny_private, allowed_nets: allowed.iter().map(|net| net.parse().unwrap()).collect() }
    }

    #[test]
    fn registration_refuses_what_is_never_right() {
        let guard = guard(false, &[]);
        for url in ["https://hooks.example.com/x", "http://10.1.2.3:8080/in", "http://127.0.0.1:9000/"] {
            assert!(guard.check_registration(url).is_ok(), "{url}");
        }
        for (url, error) in [
            ("ftp://example.com/", CallbackError::Scheme),
            ("not a url", CallbackError::Invalid),
            ("http://169.254.169.254/latest/meta-data", CallbackError::Forbidden(String::new())),
            ("http://[fe80::1]/", CallbackError::Forbidden(String::new())),
            ("http://0.0.0.0:80/", CallbackError::Forbidden(String::new())),
            ("http://224.0.0.1/", CallbackError::Forbidden(String::new())),
            ("http://metadata.google.internal/", CallbackError::Forbidden(String::new())),
            ("http://[::ffff:169.254.169.254]/", CallbackError::Forbidden(String::new())),
        ] {
            let refused = guard.check_registration(url).unwrap_err();
            assert_eq!(std::mem::discriminant(&refused), std::mem::discriminant(&error), "{url}: {refused}");
        }
    }

    #[test]
    fn delivery_refuses_loopback_and_optionally_private() {
        let open = guard(false, &[]);
        assert!(open.check_address("127.0.0.1".parse().unwrap()).is_err());
        assert!(open.check_address("::1".parse().unwrap()).is_err());
        assert!(open.check_address("::ffff:127.0.0.1".parse().unwrap()).is_err());
        assert!(open.check_address("10.0.0.5".parse().unwrap()).is_ok());
        assert!(open.check_address("93.184.216.34".parse().unwrap()).is_ok());
        let strict = guard(true, &["10.9.0.0/16"]);
        assert!(strict.check_address("10.0.0.5".parse().unwrap()).is_err());
        assert!(strict.check_address("192.168.1.1".parse().unwrap()).is_err());
        assert!(strict.check_address("fd12::1".parse().unwrap()).is_err());
        assert!(strict.check_address("10.9.3.4".parse().unwrap()).is_ok(), "allowed nets win");
        let local = guard(false, &["127.0.0.0/8"]);
        assert!(local.check_address("127.0.0.1".parse().unwrap()).is_ok());
    }
}
