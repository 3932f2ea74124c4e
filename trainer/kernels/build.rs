//! Tells the tests which kernels this machine can run: a test of a path the CPU lacks is
//! compiled as ignored, saying why, rather than passing without running. Tests are built where
//! they run, so the build machine's CPU is the test machine's.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-check-cfg=cfg(cpu_avx512, cpu_amx)");
    let flags = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("flags"))?.to_owned();
            Some(
                line.split_whitespace()
                    .map(str::to_owned)
                    .collect::<Vec<_>>(),
            )
        })
        .unwrap_or_default();
    let has = |flag: &str| flags.iter().any(|f| f == flag);
    // The kernel lists `amx_*` only where it can hand out the tile state.
    let found = [
        ("avx512", has("avx512f") && has("fma")),
        ("amx", has("amx_bf16") && has("amx_tile") && has("avx512bw")),
    ];
    for (name, present) in found {
        if present {
            println!("cargo:rustc-cfg=cpu_{name}");
        }
        // Read by dependents' build scripts as DEP_FLYWHEEL_KERNELS_<NAME>.
        println!("cargo:{name}={}", present as u8);
    }
}
