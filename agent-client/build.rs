//! Generates the protocol code from `protos/agent.proto` at build time.
//! ttrpc-codegen parses the .proto files in pure Rust: no `protoc` is needed on the machine.
use std::{env, fs, path::PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    println!("cargo:rerun-if-changed=protos/agent.proto");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("protocol");
    fs::create_dir_all(&out).unwrap();
    Codegen::new()
        .inputs(["protos/agent.proto"])
        .include("protos")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().generate_accessors(true))
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .out_dir(&out)
        .run()
        .expect("generating the agent protocol from protos/agent.proto");
    // `include!` cannot take files with inner attributes: drop them.
    for entry in fs::read_dir(&out).unwrap() {
        let path = entry.unwrap().path();
        let text = fs::read_to_string(&path).unwrap();
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
            .collect();
        fs::write(&path, kept.join("\n")).unwrap();
    }
}
