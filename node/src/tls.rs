//! TLS for kv's two listeners and its clients: reading certificate and key
//! files, the identity a certificate carries, and how a connection is
//! secured on each side.
//!
//! - **Identities.** A node's certificate names its member id as a URI
//!   subject alternative name, `urn:kv:node:<id>`; a client's names
//!   `urn:kv:client:<name>`. Only the first kind is ever a peer identity
//!   ([`member_named_by`]), so a client certificate, even from the cluster's
//!   CA, can never speak for a member. Hostname checks use the DNS and IP
//!   names of the same certificate, as usual.
//! - **Files.** PEM files; a private key readable by group or others is
//!   refused ([`read_key`]). Key bytes are never logged or put in errors.
//! - **Client side.** [`Transport`] turns an address into a gRPC endpoint:
//!   `http://` in plaintext, `https://` with the CA and, for mutual TLS,
//!   an identity.
//! - **Server side.** [`ServerTls`] holds the configuration of the client
//!   listener (client certificates optional or demanded) and of the peer
//!   listener (a certificate from the cluster CA always demanded).
//!
//! Not here: certificate generation ([`crate::certs`]); the check that a
//! replication message comes from the member its certificate names
//! (`server::auth`). Certificates are read once, at start: a reload needs a
//! restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::server::config::TlsSettings;

/// The URI a node's certificate names it by: `urn:kv:node:<id>`.
pub fn node_uri(id: u64) -> String {
    format!("{NODE_URI_PREFIX}{id}")
}

/// The URI a client's certificate names it by: `urn:kv:client:<name>`.
pub fn client_uri(name: &str) -> String {
    format!("{CLIENT_URI_PREFIX}{name}")
}

const NODE_URI_PREFIX: &str = "urn:kv:node:";
const CLIENT_URI_PREFIX: &str = "urn:kv:client:";

/// Why TLS material cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{}: a private key readable by group or others (mode {mode:o}) is refused; chmod 600 it",
        path.display()
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{0}")]
    Endpoint(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_path_buf(),
        error,
    })
}

/// Reads a PEM file of certificates, checking that it holds at least one.
pub fn read_certs(path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(path)?;
    let found = x509_parser::pem::Pem::iter_from_buffer(&pem)
        .filter(|p| p.as_ref().is_ok_and(|p| p.label == "CERTIFICATE"))
        .count();
    if found == 0 {
        return Err(TlsError::Invalid {
            path: path.to_path_buf(),
            reason: "no PEM certificate in it".into(),
        });
    }
    Ok(pem)
}

/// Reads a PEM private key, refusing one that group or others may read.
pub fn read_key(path: &Path) -> Result<Vec<u8>, TlsError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|error| TlsError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TlsError::KeyPermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    let pem = read(path)?;
    let is_key = x509_parser::pem::Pem::iter_from_buffer(&pem)
        .any(|p| p.is_ok_and(|p| p.label.ends_with("PRIVATE KEY")));
    if !is_key {
        return Err(TlsError::Invalid {
            path: path.to_path_buf(),
            reason: "no PEM private key in it".into(),
        });
    }
    Ok(pem)
}

/// The member id a (DER) certificate names, if it names one.
///
/// `Err` if the certificate cannot be parsed or names more than one member.
pub fn member_named_by(der: &[u8]) -> Result<Option<u64>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subject alternative names: {e}"))?;
    let mut ids = Vec::new();
    for name in sans.iter().flat_map(|s| s.value.general_names.iter()) {
        if let x509_parser::extensions::GeneralName::URI(uri) = name
            && let Some(id) = uri.strip_prefix(NODE_URI_PREFIX)
        {
            let id = id
                .parse::<u64>()
                .map_err(|_| format!("malformed member URI {uri:?}"))?;
            ids.push(id);
        }
    }
    match ids.as_slice() {
        [] => Ok(None),
        [id] => Ok(Some(*id)),
        _ => Err(format!("the certificate names several members: {ids:?}")),
    }
}

/// PEM bytes of a certificate chain and its key.
#[derive(Clone)]
pub struct IdentityFiles {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl std::fmt::Debug for IdentityFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key never reaches a log.
        f.debug_struct("IdentityFiles").finish_non_exhaustive()
    }
}

impl IdentityFiles {
    /// Reads a certificate file and its key file.
    pub fn load(cert: &Path, key: &Path) -> Result<IdentityFiles, TlsError> {
        Ok(IdentityFiles {
            cert: read_certs(cert)?,
            key: read_key(key)?,
        })
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert, &self.key)
    }
}

/// How a client (the CLI, or a node dialing a peer) secures its
/// connections: plaintext, or TLS against a CA with an optional identity.
#[derive(Debug, Clone, Default)]
pub struct Transport {
    tls: Option<ClientTlsConfig>,
}

impl Transport {
    /// No TLS (`http://`).
    pub fn plaintext() -> Transport {
        Transport { tls: None }
    }

    /// TLS trusting the CA in `ca_pem`, presenting `identity` if given
    /// (mutual TLS).
    pub fn tls(ca_pem: &[u8], identity: Option<&IdentityFiles>) -> Transport {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
        if let Some(identity) = identity {
            tls = tls.identity(identity.identity());
        }
        Transport { tls: Some(tls) }
    }

    /// True if connections use TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// An endpoint for `addr` (its server name, for the certificate check,
    /// is the address itself).
    pub fn endpoint(&self, addr: SocketAddr) -> Result<Endpoint, TlsError> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| TlsError::Endpoint(format!("endpoint {addr}: {e}")))?;
        match &self.tls {
            None => Ok(endpoint),
            Some(tls) => endpoint
                .tls_config(tls.clone())
                .map_err(|e| TlsError::Endpoint(format!("TLS for {addr}: {e}"))),
        }
    }
}

/// The TLS configuration of a node's two listeners.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The client listener: the node's identity; client certificates
    /// demanded only with client-certificate authentication on.
    pub client: ServerTlsConfig,
    /// The peer listener: the node's identity, and a certificate from the
    /// cluster CA demanded of every caller.
    pub peer: ServerTlsConfig,
}

impl ServerTls {
    /// From the node's identity, the cluster CA, and the CA client
    /// certificates must come from (`None`: no client-certificate
    /// authentication).
    pub fn new(identity: &IdentityFiles, cluster_ca: &[u8], client_ca: Option<&[u8]>) -> ServerTls {
        let handshake = std::time::Duration::from_secs(10);
        let peer = ServerTlsConfig::new()
            .identity(identity.identity())
            .client_ca_root(Certificate::from_pem(cluster_ca))
            .client_auth_optional(false)
            .timeout(handshake);
        let mut client = ServerTlsConfig::new()
            .identity(identity.identity())
            .timeout(handshake);
        if let Some(ca) = client_ca {
            client = client
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(false);
        }
        ServerTls { client, peer }
    }
}

/// A node's TLS, from the files its `[tls]` settings name: what its
/// listeners present and demand, and how it dials its peers.
#[derive(Debug, Clone)]
pub struct NodeTls {
    /// Both listeners' configuration.
    pub server: ServerTls,
    /// Its connections to the other members: the cluster CA, its own
    /// certificate as identity.
    pub peer_transport: Transport,
}

impl NodeTls {
    /// Reads the files and checks that the node's certificate names
    /// `node_id` (a node started with another member's certificate would be
    /// refused by every peer; better to say so at start).
    pub fn load(settings: &TlsSettings, node_id: u64) -> Result<NodeTls, TlsError> {
        let ca = read_certs(&settings.ca)?;
        let identity = IdentityFiles::load(&settings.cert, &settings.key)?;
        let leaf = x509_parser::pem::Pem::iter_from_buffer(&identity.cert)
            .find_map(Result::ok)
            .ok_or_else(|| TlsError::Invalid {
                path: settings.cert.clone(),
                reason: "no certificate in it".into(),
            })?;
        match member_named_by(&leaf.contents) {
            Ok(Some(id)) if id == node_id => {}
            Ok(named) => {
                return Err(TlsError::Invalid {
                    path: settings.cert.clone(),
                    reason: format!(
                        "this node is {node_id}, its certificate names {} (expected a URI \
                         subject alternative name {})",
                        named.map_or("no member".to_owned(), |id| format!("member {id}")),
                        node_uri(node_id)
                    ),
                });
            }
            Err(reason) => {
                return Err(TlsError::Invalid {
                    path: settings.cert.clone(),
                    reason,
                });
            }
        }
        let client_ca = if settings.client_cert_auth {
            Some(match &settings.client_ca {
                Some(path) => read_certs(path)?,
                None => ca.clone(),
            })
        } else {
            None
        };
        Ok(NodeTls {
            server: ServerTls::new(&identity, &ca, client_ca.as_deref()),
            peer_transport: Transport::tls(&ca, Some(&identity)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{Authority, Validity};

    #[test]
    fn a_node_certificate_names_its_member_and_a_client_certificate_none() {
        let ca = Authority::new("test", Validity::days(1)).unwrap();
        let node = ca
            .node(7, &["127.0.0.1".into()], Validity::days(1))
            .unwrap();
        let client = ca.client("admin", Validity::days(1)).unwrap();
        assert_eq!(member_named_by(&node.der).unwrap(), Some(7));
        assert_eq!(member_named_by(&client.der).unwrap(), None);
        assert!(member_named_by(b"garbage").is_err());
    }

    #[test]
    fn a_key_readable_by_others_is_refused_and_never_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("test", Validity::days(1)).unwrap();
        let node = ca.node(1, &[], Validity::days(1)).unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, &node.key_pem).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let err = read_key(&path).unwrap_err().to_string();
            assert!(err.contains("chmod 600"), "{err}");
            assert!(!err.contains("PRIVATE"), "{err}");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        read_key(&path).unwrap();
        let not_a_key = dir.path().join("cert.pem");
        std::fs::write(&not_a_key, &node.cert_pem).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&not_a_key, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert!(read_key(&not_a_key).is_err());
        assert!(read_certs(&path).is_err());
    }
}
