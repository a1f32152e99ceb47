//! TLS for clients and mutual TLS between regions (rustls with ring; no OpenSSL).
//!
//! # Configuration
//! - `tls_cert`, `tls_key` (PEM): the node's certificate chain and key. With them every gRPC
//!   connection is TLS (health checks and reflection too; the metrics endpoint stays plain HTTP
//!   on its own address).
//! - `tls_ca` (PEM): the certificate authority of the deployment. Clients may present a
//!   certificate signed by it (optional: ordinary clients authenticate with tokens); a node's
//!   pullers verify their peers' server certificates against it and present the node's own
//!   certificate, so a node with TLS speaks TLS to its peers (`host:port` peers are dialled as
//!   `https://`).
//!
//! # A peer's region
//! A certificate names the region it speaks for in a subject alternative name URI
//! `urn:quiver:region:N` ([`REGION_URI_PREFIX`]). The server takes a caller's region from its
//! verified certificate, never from the request: `Pull` and `Snapshot` serve only that region's
//! own stream ([`crate::auth`]). A certificate naming two regions, or a region that is not a
//! number from 0 to `REGION_ID_MAX`, is refused (`UNAUTHENTICATED`). A certificate without the
//! URI identifies nobody: its holder needs a token like any client.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

use crate::replication::REGION_ID_MAX;

/// How a certificate names its region: this and the region number, as a SAN URI.
pub const REGION_URI_PREFIX: &str = "urn:quiver:region:";

/// Largest PEM file read (certificate chains and keys are a few KiB).
pub const PEM_BYTES_MAX: u64 = 1 << 20;

/// A node's TLS material.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    ca_pem: Option<Vec<u8>>,
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if meta.len() > PEM_BYTES_MAX {
        return Err(format!("{what} {} is over {PEM_BYTES_MAX} bytes", path.display()));
    }
    let pem = std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(format!("{what} {} is not PEM", path.display()));
    }
    Ok(pem)
}

impl TlsConfig {
    /// Reads the node's certificate chain and key, and the deployment's CA if given.
    pub fn load(cert: &Path, key: &Path, ca: Option<&Path>) -> Result<TlsConfig, String> {
        Ok(TlsConfig {
            cert_pem: read_pem(cert, "TLS certificate")?,
            key_pem: read_pem(key, "TLS key")?,
            ca_pem: ca.map(|p| read_pem(p, "TLS CA")).transpose()?,
        })
    }

    /// The server side: the node's identity; with a CA, client certificates are requested and
    /// verified (optional).
    pub fn server(&self) -> ServerTlsConfig {
        let cfg = ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        match &self.ca_pem {
            Some(ca) => cfg.client_ca_root(Certificate::from_pem(ca)).client_auth_optional(true),
            None => cfg,
        }
    }

    /// The client side toward peers: their certificates are verified against the CA and the
    /// node's own certificate is presented. `None` without a CA (a node cannot verify peers).
    pub fn peer_client(&self) -> Option<ClientTlsConfig> {
        let ca = self.ca_pem.as_ref()?;
        Some(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(Identity::from_pem(&self.cert_pem, &self.key_pem)),
        )
    }
}

/// The region the caller's verified client certificate names, if it presented one that does.
pub fn peer_region<T>(req: &Request<T>) -> Result<Option<u32>, Status> {
    let Some(certs) = req.peer_certs() else { return Ok(None) };
    let Some(leaf) = certs.first() else { return Ok(None) };
    region_of_certificate(leaf.as_ref()).map_err(Status::unauthenticated)
}

/// The region a DER certificate names in its `urn:quiver:region:N` SAN URI, if any.
pub fn region_of_certificate(der: &[u8]) -> Result<Option<u32>, String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("client certificate: {e}"))?;
    let san = cert.subject_alternative_name().map_err(|e| format!("client certificate SAN: {e}"))?;
    let mut region = None;
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        let GeneralName::URI(uri) = name else { continue };
        let Some(n) = uri.strip_prefix(REGION_URI_PREFIX) else { continue };
        let r = n
            .parse::<u32>()
            .ok()
            .filter(|&r| r <= REGION_ID_MAX)
            .ok_or_else(|| format!("client certificate names region {n:?} (0 to {REGION_ID_MAX})"))?;
        if region.is_some_and(|x| x != r) {
            return Err("client certificate names more than one region".into());
        }
        region = Some(r);
    }
    Ok(region)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(uris: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        for u in uris {
            params.subject_alt_names.push(rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*u).expect("ia5")));
        }
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("sign").der().to_vec()
    }

    #[test]
    fn a_certificate_names_at_most_one_valid_region() {
        assert_eq!(region_of_certificate(&cert_with(&[])), Ok(None));
        assert_eq!(region_of_certificate(&cert_with(&["https://example.com"])), Ok(None));
        assert_eq!(region_of_certificate(&cert_with(&["urn:quiver:region:7"])), Ok(Some(7)));
        assert_eq!(region_of_certificate(&cert_with(&["urn:quiver:region:7", "urn:quiver:region:7"])), Ok(Some(7)));
        assert!(region_of_certificate(&cert_with(&["urn:quiver:region:7", "urn:quiver:region:8"])).is_err());
        assert!(region_of_certificate(&cert_with(&["urn:quiver:region:64"])).is_err());
        assert!(region_of_certificate(&cert_with(&["urn:quiver:region:x"])).is_err());
        assert!(region_of_certificate(b"not a certificate").is_err());
    }
}
