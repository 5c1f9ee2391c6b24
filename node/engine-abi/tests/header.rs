//! The committed C header `include/helexa_engine.h` must match what cbindgen generates from the
//! crate; run with `HELEXA_BLESS=1` to rewrite it after an intentional ABI change.

use std::path::Path;

#[test]
fn header_is_up_to_date() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("cbindgen.toml must parse");
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen must generate the header");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("header is UTF-8");

    let header_path = crate_dir.join("include/helexa_engine.h");
    if std::env::var_os("HELEXA_BLESS").is_some() {
        std::fs::write(&header_path, &generated).expect("write the header");
        return;
    }
    let committed = std::fs::read_to_string(&header_path).unwrap_or_default();
    if committed != generated {
        let first_diff = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
        panic!(
            "{} is out of date (first difference at line {}).\n\
             Refresh it with: HELEXA_BLESS=1 cargo test -p helexa-engine-abi --test header\n\
             and commit the result.",
            header_path.display(),
            first_diff + 1
        );
    }
}

/// cbindgen cannot export `&str` constants, so the header spells them by hand (cbindgen.toml
/// `after_includes`); keep them equal to the Rust constants.
#[test]
fn header_string_constants_match_rust() {
    let header = include_str!("../include/helexa_engine.h");
    assert!(header.contains(&format!(
        "#define HELEXA_ENTRY_SYMBOL \"{}\"",
        helexa_engine_abi::ENTRY_SYMBOL
    )));
    assert!(header.contains(&format!(
        "#define HELEXA_ENGINE_V1_INTERFACE \"{}\"",
        helexa_engine_abi::ENGINE_V1_INTERFACE
    )));
}
