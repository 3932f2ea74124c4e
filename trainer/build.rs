//! Tests of the bf16 path are compiled as ignored, saying why, on a machine whose CPU has no
//! AMX, rather than passing without running: `flywheel-kernels`' build script tells what the
//! CPU has (tests are built where they run).

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_FLYWHEEL_KERNELS_AMX");
    println!("cargo:rustc-check-cfg=cfg(cpu_amx)");
    if std::env::var("DEP_FLYWHEEL_KERNELS_AMX").as_deref() == Ok("1") {
        println!("cargo:rustc-cfg=cpu_amx");
    }
}
