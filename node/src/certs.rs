//! `kv certs init`: a development certificate authority, and node and
//! client certificates signed by it, made with `rcgen`.
//!
//! A node certificate names its member (`urn:kv:node:<id>`, see
//! [`crate::tls`]) and the hosts it serves on (DNS names or IP
//! addresses, for the clients' hostname check); it is good for both ends
//! of a connection, since a node both serves and dials its peers. A client
//! certificate names `urn:kv:client:<name>` and is good only for the client
//! end. Tests use [`Authority`] directly, for foreign CAs and expired
//! certificates.
//!
//! This is a quick start, not a PKI: no revocation, no intermediate CAs.
//! Production clusters bring certificates from their own CA with the same
//! names.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{what}: {reason}")]
    Name { what: String, reason: String },
    #[error("write {}: {error}", path.display())]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} already exists; pass --force to replace the certificates there", path.display())]
    Exists { path: PathBuf },
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clock skew) for `days` days.
    pub fn days(days: u32) -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(i64::from(days)),
        }
    }

    /// Ended a day ago (for tests of refusal).
    pub fn expired() -> Validity {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::days(30),
            not_after: now - Duration::days(1),
        }
    }
}

/// A certificate and its private key, PEM and DER.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// A certificate authority: its own certificate and the key it signs with.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate and key.
    pub issued: Issued,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

fn san(what: &str, name: &str) -> Result<SanType, CertsError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let ia5 = |s: &str| {
        s.try_into().map_err(|e: rcgen::Error| CertsError::Name {
            what: what.to_owned(),
            reason: format!("{s:?}: {e}"),
        })
    };
    if name.starts_with("urn:") {
        Ok(SanType::URI(ia5(name)?))
    } else {
        Ok(SanType::DnsName(ia5(name)?))
    }
}

impl Authority {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str, validity: Validity) -> Result<Authority, CertsError> {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "kv");
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let issued = Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        };
        Ok(Authority {
            issuer: Issuer::new(params, key),
            issued,
        })
    }

    fn sign(
        &self,
        common_name: &str,
        names: Vec<SanType>,
        usages: Vec<ExtendedKeyUsagePurpose>,
        validity: Validity,
    ) -> Result<Issued, CertsError> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "kv");
        params.subject_alt_names = names;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        })
    }

    /// A certificate for member `id`, serving on `hosts` (DNS names or IP
    /// addresses); good for serving and for dialing peers.
    pub fn node(
        &self,
        id: u64,
        hosts: &[String],
        validity: Validity,
    ) -> Result<Issued, CertsError> {
        let what = format!("node {id}");
        let mut names = vec![san(&what, &crate::tls::node_uri(id))?];
        for host in hosts {
            names.push(san(&what, host)?);
        }
        self.sign(
            &format!("node{id}"),
            names,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            validity,
        )
    }

    /// A client certificate for `name`; good only for the client end.
    pub fn client(&self, name: &str, validity: Validity) -> Result<Issued, CertsError> {
        let what = format!("client {name}");
        self.sign(
            name,
            vec![san(&what, &crate::tls::client_uri(name))?],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            validity,
        )
    }
}

/// What `kv certs init` makes.
#[derive(Debug, Clone)]
pub struct InitPlan {
    /// Nodes 1..=nodes get a certificate each.
    pub nodes: u64,
    /// One client certificate per name.
    pub clients: Vec<String>,
    /// Hosts every node certificate names (the nodes' listen addresses).
    pub hosts: Vec<String>,
    /// Validity of every certificate, CA included.
    pub days: u32,
    /// Replace files that exist.
    pub force: bool,
}

/// Writes a private key readable by its owner only (created so: never
/// readable by others, not even for a moment).
fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<(), CertsError> {
    use std::io::Write;
    let err = |error| CertsError::Write {
        path: path.to_path_buf(),
        error,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(err)?;
    #[cfg(unix)]
    if private {
        // An existing file keeps its mode on open: set it.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(err)?;
    }
    let _ = private;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)
}

/// `kv certs init`: writes `ca.pem` + `ca-key.pem`, `node<N>.pem` +
/// `node<N>-key.pem` for each node, `<client>.pem` + `<client>-key.pem`
/// for each client, into `out` (created on demand). Returns the files
/// written, in order. Refuses to overwrite without `force`.
pub fn init(out: &Path, plan: &InitPlan) -> Result<Vec<PathBuf>, CertsError> {
    let mut files: Vec<(PathBuf, String, bool)> = Vec::new();
    let validity = Validity::days(plan.days);
    let ca = Authority::new("kv dev", validity)?;
    files.push((out.join("ca.pem"), ca.issued.cert_pem.clone(), false));
    files.push((out.join("ca-key.pem"), ca.issued.key_pem.clone(), true));
    for id in 1..=plan.nodes {
        let node = ca.node(id, &plan.hosts, validity)?;
        files.push((out.join(format!("node{id}.pem")), node.cert_pem, false));
        files.push((out.join(format!("node{id}-key.pem")), node.key_pem, true));
    }
    for name in &plan.clients {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(CertsError::Name {
                what: format!("client {name:?}"),
                reason: "a client name is letters, digits, '-' and '_'".into(),
            });
        }
        let client = ca.client(name, validity)?;
        files.push((out.join(format!("{name}.pem")), client.cert_pem, false));
        files.push((out.join(format!("{name}-key.pem")), client.key_pem, true));
    }
    if !plan.force
        && let Some((path, _, _)) = files.iter().find(|(p, _, _)| p.exists())
    {
        return Err(CertsError::Exists { path: path.clone() });
    }
    std::fs::create_dir_all(out).map_err(|error| CertsError::Write {
        path: out.to_path_buf(),
        error,
    })?;
    for (path, pem, private) in &files {
        write_file(path, pem.as_bytes(), *private)?;
    }
    Ok(files.into_iter().map(|(p, _, _)| p).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_every_file_keys_private_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let plan = InitPlan {
            nodes: 2,
            clients: vec!["admin".into()],
            hosts: vec!["127.0.0.1".into(), "localhost".into()],
            days: 1,
            force: false,
        };
        let files = init(&out, &plan).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "ca.pem",
                "ca-key.pem",
                "node1.pem",
                "node1-key.pem",
                "node2.pem",
                "node2-key.pem",
                "admin.pem",
                "admin-key.pem"
            ]
        );
        for path in &files {
            let is_key = path.to_string_lossy().ends_with("-key.pem");
            if is_key {
                crate::tls::read_key(path).unwrap();
            } else {
                crate::tls::read_certs(path).unwrap();
            }
        }
        let node2 = std::fs::read(out.join("node2.pem")).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&node2).unwrap();
        assert_eq!(crate::tls::member_named_by(&pem.contents).unwrap(), Some(2));
        let again = init(&out, &plan).unwrap_err().to_string();
        assert!(again.contains("--force"), "{again}");
        init(
            &out,
            &InitPlan {
                force: true,
                ..plan.clone()
            },
        )
        .unwrap();
        let bad = InitPlan {
            clients: vec!["../x".into()],
            force: true,
            ..plan
        };
        assert!(init(&out, &bad).is_err());
    }
}
