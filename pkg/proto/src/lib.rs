//! Generated protobuf and gRPC bindings for the `barrage.v1` package.
//!
//! The `.proto` files under `proto/` are the contract; this crate is built
//! from them at compile time and never edited by hand. [`FILE_DESCRIPTOR_SET`]
//! feeds server reflection so grpcurl works without proto files.

#![allow(missing_docs, clippy::all)]

/// `barrage.v1`: the public push API and the internal services.
pub mod v1 {
    tonic::include_proto!("barrage.v1");
}

/// Encoded `FileDescriptorSet` of every barrage proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/barrage_descriptor.bin"));

/// Server reflection services for every barrage proto: v1 and v1alpha, so
/// both current grpcurl and older tools (which speak only v1alpha) work.
pub fn reflection_services() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok((v1, v1alpha))
}
