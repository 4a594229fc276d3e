//! Who is calling the replication service, and whether a message may claim
//! the sender it claims.
//!
//! Every replication message names its sender (`from.node_id`); a claim is
//! cheap, so the claim is checked against the connection it came over
//! before anything else runs: before a term is adopted, a vote given, a
//! record appended or a log truncated. A refusal is `PERMISSION_DENIED`
//! and changes nothing.
//!
//! How a connection is identified is a seam ([`PeerAuth`]):
//! - [`Certificates`] (a node with TLS): the caller's certificate, verified
//!   against the cluster CA by the TLS layer, must name a member
//!   (`urn:kv:node:<id>`); a client certificate names none and is refused.
//! - [`TrustClaims`] (plaintext): every claim is believed, as before TLS —
//!   for loopback development only.
//! - A simulation supplies its own (by the caller's simulated address), so
//!   it can drive forged messages from a stranger through the same check.
//!
//! Not here: the TLS handshake, the certificate chain and its validity
//! period (rustls, configured in `crate::tls`), and the cluster-id and
//! membership checks that follow (`Node::check_sender`, `accept_leader`).

use std::net::SocketAddr;
use std::sync::Arc;

use tonic::Status;
use tonic::transport::CertificateDer;

/// What is known of a connection to the peer service.
#[derive(Debug, Clone, Default)]
pub struct PeerConn {
    /// The caller's address, if the transport knows it.
    pub remote: Option<SocketAddr>,
    /// The caller's verified certificate chain (leaf first), with TLS.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl PeerConn {
    /// What a request's connection says of its caller.
    pub fn of<T>(request: &tonic::Request<T>) -> PeerConn {
        PeerConn {
            remote: request.remote_addr(),
            certs: request.peer_certs(),
        }
    }
}

/// Who a connection to the peer service is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// Member `id`, proven by the connection.
    Member(u64),
    /// Unproven (plaintext): claims are believed.
    Unverified,
}

impl Caller {
    /// Checks that a message from this caller may claim to be from
    /// `claimed` (`None`: the message names no sender, which the handler
    /// refuses on its own).
    pub fn may_claim(self, claimed: Option<u64>) -> Result<(), Status> {
        match (self, claimed) {
            (Caller::Unverified, _) | (_, None) => Ok(()),
            (Caller::Member(id), Some(claimed)) if id == claimed => Ok(()),
            (Caller::Member(id), Some(claimed)) => Err(Status::permission_denied(format!(
                "the connection is node {id}'s, the message claims to be from node {claimed}"
            ))),
        }
    }
}

/// Identifies the caller of the peer service.
pub trait PeerAuth: Send + Sync + std::fmt::Debug + 'static {
    /// Who `conn` is, or a `PERMISSION_DENIED` refusal.
    fn identify(&self, conn: &PeerConn) -> Result<Caller, Status>;
}

/// Plaintext: every claim is believed (no proof is possible).
#[derive(Debug, Clone, Copy, Default)]
pub struct TrustClaims;

impl PeerAuth for TrustClaims {
    fn identify(&self, _: &PeerConn) -> Result<Caller, Status> {
        Ok(Caller::Unverified)
    }
}

/// TLS: the member the caller's certificate names.
#[derive(Debug, Clone, Copy, Default)]
pub struct Certificates;

impl PeerAuth for Certificates {
    fn identify(&self, conn: &PeerConn) -> Result<Caller, Status> {
        let leaf = conn
            .certs
            .as_ref()
            .and_then(|chain| chain.first())
            .ok_or_else(|| {
                Status::permission_denied("the peer service needs a node certificate")
            })?;
        match crate::tls::member_named_by(leaf) {
            Ok(Some(id)) => Ok(Caller::Member(id)),
            Ok(None) => Err(Status::permission_denied(
                "the certificate names no member (a client certificate is not a peer)",
            )),
            Err(reason) => Err(Status::permission_denied(reason)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{Authority, Validity};

    fn conn(der: Vec<u8>) -> PeerConn {
        PeerConn {
            remote: None,
            certs: Some(Arc::new(vec![CertificateDer::from(der)])),
        }
    }

    #[test]
    fn only_a_node_certificate_speaks_and_only_for_its_own_member() {
        let ca = Authority::new("t", Validity::days(1)).unwrap();
        let node3 = ca.node(3, &[], Validity::days(1)).unwrap();
        let admin = ca.client("admin", Validity::days(1)).unwrap();
        let caller = Certificates.identify(&conn(node3.der)).unwrap();
        assert_eq!(caller, Caller::Member(3));
        caller.may_claim(Some(3)).unwrap();
        let forged = caller.may_claim(Some(2)).unwrap_err();
        assert_eq!(forged.code(), tonic::Code::PermissionDenied);
        let client = Certificates.identify(&conn(admin.der)).unwrap_err();
        assert_eq!(client.code(), tonic::Code::PermissionDenied);
        let none = Certificates.identify(&PeerConn::default()).unwrap_err();
        assert_eq!(none.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            TrustClaims.identify(&PeerConn::default()).unwrap(),
            Caller::Unverified
        );
    }
}
