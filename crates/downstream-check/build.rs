// build.rs: without it a binary runs on the CPU only, even on a GPU machine
fn main() {
    if let Err(e) = moe_layers_build::link_libtorch() {
        println!("cargo:warning={e}");
    }
}
