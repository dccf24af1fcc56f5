//! The TLS configuration shared by every registry host without certs.d
//! material: the platform's roots, loaded once per process and only when
//! a handshake first needs them (or ahead of time, by [`warm`]).
//!
//! Building a reqwest client loads every CA of the system store, about
//! 150 files and 25 ms here, on each new host; in a fresh clipd that sat
//! on a container's start path even for plain-HTTP registries.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The platform verifier, built on first use.
fn platform() -> &'static Result<rustls_platform_verifier::Verifier, rustls::Error> {
    static V: OnceLock<Result<rustls_platform_verifier::Verifier, rustls::Error>> = OnceLock::new();
    V.get_or_init(|| rustls_platform_verifier::Verifier::new(provider()))
}

/// Loads the platform's roots now (blocking), so that the first TLS
/// handshake does not wait for them; a daemon calls it from a background
/// thread when it starts.
pub fn warm() {
    let _ = platform();
}

/// Verifies chains with the platform verifier, loaded lazily; signatures
/// need no roots and are checked with the provider directly.
#[derive(Debug)]
struct Lazy {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lazy {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match platform() {
            Ok(v) => v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now),
            Err(e) => Err(e.clone()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A client configuration that verifies servers against the platform's
/// roots, loading them at the first handshake; ALPN as reqwest sets it.
pub(crate) fn lazy_config() -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Lazy { provider }))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}
