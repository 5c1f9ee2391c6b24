//! Chat templates against transformers' renderings (`fixtures/templates/cases.json`).

use helexa_node::Error;
use helexa_node::detok::ModelTokenizer;
use helexa_node::template::{ChatTemplate, RenderInput};
use serde_json::Value;

use crate::{fixtures, read_json};

#[test]
fn every_case_matches_transformers_byte_for_byte() {
    let dir = fixtures().join("templates");
    let cases = read_json(&dir.join("cases.json"));
    let source = std::fs::read_to_string(dir.join("chat_template.jinja")).expect("template");
    let template = ChatTemplate::new(&source, None, Some("<|im_end|>".into())).expect("compiles");
    let tokenizer =
        ModelTokenizer::from_file(&fixtures().join("tiny-qwen3/tokenizer.json"), &[2, 0], None)
            .expect("tokenizer");
    let cases = cases["cases"].as_array().expect("cases list");
    assert!(cases.len() >= 6, "expected the full case list");
    let mut raised = 0;
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let messages = case["messages"].as_array().expect("messages").clone();
        let tools = case["tools"].as_array().cloned();
        let kwargs = case["chat_template_kwargs"].as_object().cloned();
        let input = RenderInput {
            messages: &messages,
            tools: tools.as_deref(),
            add_generation_prompt: case["add_generation_prompt"].as_bool().expect("flag"),
            kwargs: kwargs.as_ref(),
        };
        let result = template.render(&input);
        match &case["expected"] {
            Value::String(expected) => {
                let rendered = result.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(&rendered, expected, "case {name}");
                if let Some(ids) = case["expected_token_ids"].as_array() {
                    let ids: Vec<u32> =
                        ids.iter().map(|v| v.as_u64().expect("id") as u32).collect();
                    assert_eq!(
                        tokenizer.encode(&rendered).expect("encode"),
                        ids,
                        "ids of {name}"
                    );
                }
            }
            _ => {
                let needle = case["expected_error_contains"]
                    .as_str()
                    .expect("error case");
                match result {
                    Err(Error::TemplateRejected(message)) => {
                        assert!(message.contains(needle), "{name}: {message}");
                        raised += 1;
                    }
                    other => panic!("{name}: expected a template exception, got {other:?}"),
                }
            }
        }
    }
    assert_eq!(raised, 1, "the late-system case must raise");
}

#[test]
fn model_dir_template_and_reference_prompts() {
    // The reference prompts of the tiny-qwen3 fixture were rendered by transformers too.
    let dir = fixtures().join("tiny-qwen3");
    let template = ChatTemplate::from_model_dir(&dir)
        .expect("readable")
        .expect("has a template");
    let reference = read_json(&dir.join("reference.json"));
    for name in ["chat", "think", "tools"] {
        let prompt = &reference["prompts"][name];
        let messages = prompt["messages"].as_array().expect("messages").clone();
        let tools = prompt["tools"].as_array().cloned();
        let kwargs = prompt["chat_template_kwargs"].as_object().cloned();
        let rendered = template
            .render(&RenderInput {
                messages: &messages,
                tools: tools.as_deref(),
                add_generation_prompt: true,
                kwargs: kwargs.as_ref(),
            })
            .expect("renders");
        assert_eq!(rendered, prompt["text"].as_str().expect("text"), "{name}");
    }
}

#[test]
fn tokenizer_config_list_and_gguf_metadata() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"eos_token": {"content": "</s>"}, "chat_template": [
            {"name": "default", "template": "D{{ messages[0].content }}{{ eos_token }}"},
            {"name": "tool_use", "template": "T{{ tools[0].name }}"}]}"#,
    )
    .expect("write");
    let template = ChatTemplate::from_model_dir(tmp.path())
        .expect("readable")
        .expect("has templates");
    let messages = vec![serde_json::json!({"role": "user", "content": "hi"})];
    let tools = vec![serde_json::json!({"name": "f"})];
    let plain = RenderInput {
        messages: &messages,
        ..Default::default()
    };
    assert_eq!(template.render(&plain).expect("renders"), "Dhi</s>");
    let with_tools = RenderInput {
        tools: Some(&tools),
        ..plain
    };
    assert_eq!(template.render(&with_tools).expect("renders"), "Tf");

    // GGUF files made by llama.cpp's converter carry the template in their metadata.
    let gguf = fixtures().join("tiny-qwen3/gguf/tiny-qwen3-Q8_0.gguf");
    let template = ChatTemplate::from_gguf(&gguf)
        .expect("readable")
        .expect("the converter stores tokenizer.chat_template");
    let rendered = template.render(&plain).expect("renders");
    assert_eq!(rendered, "<|im_start|>userhi<|im_end|>\n");
    assert_eq!(template.eos_token(), Some("<|im_end|>"));
}

#[test]
fn pycompat_methods_and_tojson() {
    let source = "{{ 'a,b'.split(',') | tojson }}|{{ '  x '.strip() }}|{{ 'abc'.startswith('ab') }}|{{ {'k': 'é<', 'n': [1, 2.5]} | tojson }}|{{ {'a': 1} | tojson(indent=2) }}";
    let template = ChatTemplate::new(source, None, None).expect("compiles");
    let rendered = template
        .render(&RenderInput {
            messages: &[],
            ..Default::default()
        })
        .expect("renders");
    assert_eq!(
        rendered,
        "[\"a\", \"b\"]|x|True|{\"k\": \"é<\", \"n\": [1, 2.5]}|{\n  \"a\": 1\n}"
    );
    let template = ChatTemplate::new("{{ strftime_now('%Y') }}", None, None).expect("compiles");
    let year = template.render(&RenderInput::default()).expect("renders");
    assert!(year.len() == 4 && year.starts_with('2'), "{year}");
}
