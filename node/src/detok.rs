//! Tokenizer wrapper and incremental detokenization.
//!
//! Byte-level BPE tokens do not map to whole characters: one emoji can span three tokens, and a
//! word's leading space belongs to the next token. [`Detokenizer`] therefore decodes a sliding
//! window (the technique of TGI and vLLM): it re-decodes the tokens since the last emitted
//! boundary and emits only the new suffix, and only once it no longer ends in U+FFFD (an
//! incomplete UTF-8 sequence). Streamed text is thus never broken UTF-8 and always equals the
//! one-shot decode.

use std::collections::HashSet;
use std::path::Path;

use tokenizers::Tokenizer;

use crate::Error;
use crate::output::Markers;

/// A model's tokenizer plus what the node derives from it.
#[derive(Clone)]
pub struct ModelTokenizer {
    inner: Tokenizer,
    /// Special tokens that are never shown (`<|im_start|>`, eos, …); markers are not among them.
    hidden: HashSet<u32>,
    /// Think / tool-call markers found among the added tokens.
    pub markers: Markers,
    /// End-of-sequence token ids: `generation_config.json` plus the tokenizer's eos.
    pub eos_ids: Vec<u32>,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer")
            .field("markers", &self.markers)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

impl ModelTokenizer {
    /// Load `tokenizer.json`; `extra_eos` are ids from `generation_config.json`, `eos_token` the
    /// eos string of `tokenizer_config.json` (or GGUF metadata).
    pub fn from_file(
        path: &Path,
        extra_eos: &[u32],
        eos_token: Option<&str>,
    ) -> Result<Self, Error> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        Ok(Self::new(inner, extra_eos, eos_token))
    }

    /// Wrap a loaded tokenizer.
    pub fn new(inner: Tokenizer, extra_eos: &[u32], eos_token: Option<&str>) -> Self {
        let added = inner.get_added_tokens_decoder();
        let markers = Markers::from_added_tokens(added.values().map(|t| t.content.as_str()));
        let marker_strings = [
            &markers.think_start,
            &markers.think_end,
            &markers.tool_start,
            &markers.tool_end,
        ];
        let hidden = added
            .iter()
            .filter(|(_, token)| {
                token.special
                    && !marker_strings
                        .iter()
                        .any(|m| m.as_deref() == Some(token.content.as_str()))
            })
            .map(|(id, _)| *id)
            .collect();
        let mut eos_ids = extra_eos.to_vec();
        if let Some(id) = eos_token.and_then(|t| inner.token_to_id(t))
            && !eos_ids.contains(&id)
        {
            eos_ids.push(id);
        }
        Self {
            inner,
            hidden,
            markers,
            eos_ids,
        }
    }

    /// Encode prompt text. Special tokens written in the text (`<|im_start|>`) are recognised;
    /// no BOS/EOS is added (chat templates write their own, as transformers does).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, Error> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer(format!("encode: {e}")))
    }

    /// Decode ids to text, special tokens included (the `/detokenize` view).
    pub fn decode(&self, ids: &[u32]) -> Result<String, Error> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(format!("decode: {e}")))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether generated `id` is shown to clients (markers are, other special tokens are not).
    pub fn is_visible(&self, id: u32) -> bool {
        !self.hidden.contains(&id)
    }

    /// A fresh streaming decoder.
    pub fn detokenizer(&self) -> Detokenizer<'_> {
        Detokenizer {
            tokenizer: self,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }
}

/// Streaming decoder over one generation (see the module docs).
pub struct Detokenizer<'a> {
    tokenizer: &'a ModelTokenizer,
    ids: Vec<u32>,
    /// Start of the window that gives the decoder context (leading-space handling).
    prefix_offset: usize,
    /// Tokens before this index are already emitted.
    read_offset: usize,
}

impl Detokenizer<'_> {
    /// Add a generated token; returns the text it completes (possibly empty). Hidden special
    /// tokens produce nothing.
    pub fn push(&mut self, id: u32) -> Result<String, Error> {
        if !self.tokenizer.is_visible(id) {
            return Ok(String::new());
        }
        self.ids.push(id);
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            // The window's prefix decodes identically inside the longer window, except when the
            // decoder cut it at an incomplete character; `get` guards that case.
            let new = full.get(prefix.len()..).unwrap_or_default().to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }

    /// End of generation: whatever is still pending (an incomplete character decodes to U+FFFD
    /// here, as a one-shot decode would).
    pub fn finish(&mut self) -> Result<String, Error> {
        if self.read_offset >= self.ids.len() {
            return Ok(String::new());
        }
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_owned())
    }
}
