//! Embeds the eBPF object built by `cargo xtask build-ebpf`, and refuses to
//! build with a missing or stale one: a stale object would meter with old
//! kernel code while the agent expects the new.

use std::{
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

fn newest(path: &Path, newest_seen: &mut Option<(SystemTime, PathBuf)>) {
    println!("cargo:rerun-if-changed={}", path.display());
    let Ok(meta) = fs::metadata(path) else { return };
    if meta.is_dir() {
        if let Ok(entries) = fs::read_dir(path) {
            for e in entries.flatten() {
                newest(&e.path(), newest_seen);
            }
        }
    } else if let Ok(m) = meta.modified()
        && newest_seen.as_ref().is_none_or(|(t, _)| m > *t)
    {
        *newest_seen = Some((m, path.to_owned()));
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest.parent().expect("agent/ is inside the workspace");
    let object = root.join("target/bpf/meterd.bpf.o");
    println!("cargo:rerun-if-changed={}", object.display());
    let mut sources = None;
    for p in [
        "ebpf/src",
        "ebpf/Cargo.toml",
        "ebpf/Cargo.lock",
        "common/src",
        "common/Cargo.toml",
    ] {
        newest(&root.join(p), &mut sources);
    }
    let built = fs::metadata(&object).and_then(|m| m.modified());
    match (built, sources) {
        (Err(_), _) => panic!(
            "\n\nThe eBPF object {} is missing: run `cargo xtask build-ebpf` first \
             (`cargo xtask run` and `cargo xtask test` do it for you).\n\n",
            object.display()
        ),
        (Ok(built), Some((changed, source))) if changed > built => panic!(
            "\n\nThe eBPF object {} is older than {}: run `cargo xtask build-ebpf`.\n\n",
            object.display(),
            source.display()
        ),
        _ => {}
    }
    println!("cargo:rustc-env=METERD_BPF_OBJECT={}", object.display());
}
