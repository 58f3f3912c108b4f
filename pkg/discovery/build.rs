//! Nothing to generate: `protoc-bin-vendored` is a build-dependency of the
//! crate that uses etcd-client only so that cargo downloads the vendored
//! `protoc` that `tools/protoc` hands to etcd-client's build script, whatever
//! package of the workspace is being built.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
