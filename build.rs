//! Nothing to generate for the binary itself: `protoc-bin-vendored` is a
//! build-dependency only so that cargo downloads the vendored `protoc` that
//! `tools/protoc` hands to etcd-client's build script.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
