//! Links the lab's programs against `libtorch.so` with a run path to it
//! ([`moe_layers_build::link_libtorch`]), so that they reach the GPU.
fn main() {
    if let Err(e) = moe_layers_build::link_libtorch() {
        println!("cargo:warning={e}");
    }
}
