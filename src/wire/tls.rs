//! TLS for the client, WebSocket and HTTP ports (rustls, ring provider):
//! the server configuration from PEM files, and the record layer of one
//! connection driven over in-memory buffers.

use super::WireError;
use bytes::BytesMut;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::{Read, Write};
use std::sync::Arc;

/// Load the certificate chain and key named in the config into a server
/// configuration. The error names which of the two (`cert` or `key`) is at
/// fault, with one line saying what is wrong with its file.
pub fn load(cert: &str, key: &str) -> Result<Arc<rustls::ServerConfig>, (&'static str, String)> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| ("cert", format!("{cert}: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| ("cert", format!("{cert}: {e}")))?;
    if certs.is_empty() {
        return Err(("cert", format!("{cert}: no certificate in the file")));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| ("key", format!("{key}: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("cert", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| ("key", format!("{key} does not fit {cert}: {e}")))?;
    Ok(Arc::new(cfg))
}

/// A client configuration that trusts the certificates in the PEM file
/// `ca` (the load tester's, against a gateway with its own certificate).
pub fn client_config(ca: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{ca}: {e}"))? {
        let c = c.map_err(|e| format!("{ca}: {e}"))?;
        roots.add(c).map_err(|e| format!("{ca}: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// One connection's TLS layer (the gateway's side, or a client's: the
/// load tester's).
pub(super) struct Tls {
    conn: rustls::Connection,
}

impl Tls {
    pub(super) fn new(cfg: Arc<rustls::ServerConfig>) -> Result<Tls, WireError> {
        let conn = rustls::ServerConnection::new(cfg).map_err(WireError::Tls)?;
        Ok(Tls::with(rustls::Connection::Server(conn)))
    }

    pub(super) fn client(cfg: Arc<rustls::ClientConfig>, name: &str) -> Result<Tls, WireError> {
        let name = rustls::pki_types::ServerName::try_from(name.to_string())
            .map_err(|e| WireError::Io(format!("server name `{name}`: {e}")))?;
        let conn = rustls::ClientConnection::new(cfg, name).map_err(WireError::Tls)?;
        Ok(Tls::with(rustls::Connection::Client(conn)))
    }

    fn with(mut conn: rustls::Connection) -> Tls {
        // What is written is bounded by the caller (one output batch).
        conn.set_buffer_limit(None);
        Tls { conn }
    }

    /// A client's first flight (its hello) onto `out`.
    pub(super) fn start(&mut self, out: &mut BytesMut) {
        self.drain(out);
    }

    pub(super) fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Decrypt `raw`: plaintext is handed to `sink`; records to send back
    /// (handshake, alerts) are appended to `out`. `Ok(true)`: the peer sent
    /// close_notify.
    pub(super) fn open(
        &mut self,
        raw: &[u8],
        out: &mut BytesMut,
        mut sink: impl FnMut(&[u8]) -> Result<(), WireError>,
    ) -> Result<bool, WireError> {
        let mut rd = raw;
        let mut closed = false;
        let mut chunk = [0u8; 4096];
        while !rd.is_empty() {
            if let Err(e) = self.conn.read_tls(&mut rd) {
                self.drain(out);
                return Err(WireError::Io(e.to_string()));
            }
            let state = match self.conn.process_new_packets() {
                Ok(s) => s,
                Err(e) => {
                    // The alert that tells the peer why.
                    self.drain(out);
                    return Err(WireError::Tls(e));
                }
            };
            closed |= state.peer_has_closed();
            loop {
                match self.conn.reader().read(&mut chunk) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => sink(&chunk[..n])?,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
        }
        self.drain(out);
        Ok(closed)
    }

    /// Encrypt `plain` onto `out`.
    pub(super) fn seal(&mut self, plain: &[u8], out: &mut BytesMut) -> Result<(), WireError> {
        self.conn
            .writer()
            .write_all(plain)
            .map_err(|e| WireError::Io(e.to_string()))?;
        self.drain(out);
        Ok(())
    }

    /// Queue close_notify.
    pub(super) fn close(&mut self, out: &mut BytesMut) {
        self.conn.send_close_notify();
        self.drain(out);
    }

    fn drain(&mut self, out: &mut BytesMut) {
        let mut w = bytes::BufMut::writer(out);
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut w).is_err() {
                break;
            }
        }
    }
}
