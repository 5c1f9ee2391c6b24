//! The example configuration loads and validates.

use helexa_node::config::RawConfig;

#[test]
fn example_config_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/node.toml");
    let config = RawConfig::read(&path)
        .expect("example parses")
        .validate(None)
        .expect("example validates");
    assert_eq!(config.listen.to_string(), "127.0.0.1:13131");
    assert_eq!(config.models.len(), 2);
    assert_eq!(config.models[1].quant.as_deref(), Some("Q8_0"));
    assert_eq!(config.admission.max_in_flight, 4);
    assert_eq!(config.admission.max_queue, 64);
}
