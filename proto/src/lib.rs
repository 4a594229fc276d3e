//! Generated gRPC types and services for kv (`proto/kv.proto`).
//!
//! Only generated code and the encoded file descriptor live here (the
//! descriptor serves gRPC reflection). Conversions between these types and
//! the engine's domain types belong to the node, at its edge.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// The `kv.v1` package.
pub mod v1 {
    tonic::include_proto!("kv.v1");
}

/// The encoded `FileDescriptorSet` of `kv.proto`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kv_descriptor");
