//! Embeds the eBPF object when `XLB_EBPF_OBJECT` names one (`cargo xtask build` and
//! `cargo xtask test` set it), so the agent is a single binary. Without it the agent
//! still builds on stable and reads the object at run time (`--bpf-object` or the same
//! variable).
fn main() {
    println!("cargo::rustc-check-cfg=cfg(xlb_embedded_object)");
    println!("cargo::rerun-if-env-changed=XLB_EBPF_OBJECT");
    if let Some(path) = std::env::var_os("XLB_EBPF_OBJECT") {
        let path = std::path::PathBuf::from(path);
        if path.is_file() {
            println!("cargo::rerun-if-changed={}", path.display());
            println!("cargo::rustc-cfg=xlb_embedded_object");
            println!("cargo::rustc-env=XLB_EMBEDDED_OBJECT={}", path.display());
        } else {
            println!(
                "cargo::warning=XLB_EBPF_OBJECT={} is not a file; nothing embedded",
                path.display()
            );
        }
    }
}
