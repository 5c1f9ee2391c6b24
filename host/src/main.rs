//! `helexa`: the gateway binary. Everything lives in the library (`helexa::cli`).

fn main() -> anyhow::Result<()> {
    helexa::cli::run()
}
