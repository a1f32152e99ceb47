//! A throwaway certificate authority for tests (feature `pki`): certificates for quiverd
//! nodes that name their region as quiverd expects (`urn:quiver:region:N`, see
//! `server/src/tls.rs`), usable as server and client certificates.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// A CA made for one test run.
pub struct Pki {
    ca: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// Where [`Pki::write`] put a certificate and its key.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
}

impl Pki {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Result<Pki, String> {
        let e = |e: rcgen::Error| format!("test CA: {e}");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(e)?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().map_err(e)?;
        let ca = params.self_signed(&key).map_err(e)?;
        Ok(Pki { ca, issuer: rcgen::Issuer::new(params, key) })
    }

    /// The CA's certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A certificate for `localhost`, 127.0.0.1 and `ips`, naming `region` if given:
    /// (certificate PEM, key PEM).
    pub fn leaf(&self, region: Option<u32>, ips: &[IpAddr]) -> Result<(String, String), String> {
        let e = |e: rcgen::Error| format!("test certificate: {e}");
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).map_err(e)?;
        params.subject_alt_names.push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        for ip in ips {
            params.subject_alt_names.push(rcgen::SanType::IpAddress(*ip));
        }
        if let Some(r) = region {
            let uri = rcgen::string::Ia5String::try_from(format!("urn:quiver:region:{r}")).map_err(e)?;
            params.subject_alt_names.push(rcgen::SanType::URI(uri));
        }
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().map_err(e)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(e)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes [`Pki::leaf`] to `dir/name.crt` and `dir/name.key`.
    pub fn write(&self, dir: &Path, name: &str, region: Option<u32>, ips: &[IpAddr]) -> Result<CertFiles, String> {
        let (cert, key) = self.leaf(region, ips)?;
        let files = CertFiles { cert: dir.join(format!("{name}.crt")), key: dir.join(format!("{name}.key")) };
        std::fs::write(&files.cert, cert).map_err(|e| format!("{}: {e}", files.cert.display()))?;
        std::fs::write(&files.key, key).map_err(|e| format!("{}: {e}", files.key.display()))?;
        Ok(files)
    }
}
