//! TLS on the SQL port (rustls with ring): the server's certificate chain and key, from PEM.
//!
//! Clients ask with an SSLRequest (`sslmode=require`, `verify-ca`, `verify-full`; tested with
//! psql and psycopg). pgwire also accepts direct TLS (`sslnegotiation=direct`), which needs
//! the ALPN protocol `postgresql` set below; that path is not tested yet. Client certificates
//! are not asked for: users authenticate with SCRAM.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// An acceptor for the certificate chain in `cert` and the private key in `key` (PEM files;
/// PKCS#8, PKCS#1 or SEC1 keys).
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "cannot read certificates from {} (--pg-tls-cert): {e}",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!(
            "{} (--pg-tls-cert) holds no PEM certificate",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "cannot read a private key from {} (--pg-tls-key): {e}",
            key.display()
        )
    })?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("the TLS certificate and key do not fit together: {e}"))?;
    // Direct TLS negotiation (libpq 17) requires the ALPN protocol `postgresql`.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
