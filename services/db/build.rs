fn main() {
    // sqlx::migrate! embeds the migrations at compile time; a changed file must rebuild.
    println!("cargo:rerun-if-changed=../../migrations");
}
