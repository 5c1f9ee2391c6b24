//! OpenAI chat and completions: identity.

use helexa_policy_translator::{
    DefaultTranslator, SseEvent, Surface, Translator, TranslatorStream,
};

use crate::fixture;

#[test]
fn bodies_are_unchanged() {
    let translator = DefaultTranslator::configure("{}").expect("settings");
    // Deliberately not canonical JSON: identity means byte for byte.
    let body = "{ \"model\":\"m\",  \"messages\":[] }";
    for surface in [Surface::OpenaiChat, Surface::OpenaiCompletions] {
        assert_eq!(
            translator.request_to_chat(surface, body).expect("identity"),
            body
        );
        assert_eq!(
            translator
                .response_from_chat(surface, "{}", body)
                .expect("identity"),
            body
        );
    }
}

#[test]
fn chunks_pass_through_and_done_is_sent_once() {
    let translator = DefaultTranslator::configure("{}").expect("settings");
    let mut stream = translator.new_stream(Surface::OpenaiChat, "{}", "chatcmpl-1");
    let chunks = fixture("stream_text.jsonl");
    let mut events = Vec::new();
    for chunk in &chunks {
        events.extend(stream.push(chunk).expect("chunk"));
    }
    events.extend(stream.push("[DONE]").expect("done chunk"));
    events.extend(stream.finish().expect("finish"));
    let mut expected: Vec<SseEvent> = chunks
        .iter()
        .map(|c| SseEvent {
            event: None,
            data: c.clone(),
        })
        .collect();
    expected.push(SseEvent {
        event: None,
        data: "[DONE]".into(),
    });
    assert_eq!(events, expected);
    assert!(stream.fail("late").is_empty());
}
