//! A safetensors file's header read and checked on its own, for the staged loader
//! (`staged_load`), which reads each tensor's bytes from the file itself: the tensors' dtypes,
//! shapes and byte ranges, checked as the safetensors crate checks them.
#![cfg_attr(
    not(feature = "cuda"),
    allow(
        dead_code,
        reason = "read by the staged loader, a GPU path; tested on the CPU"
    )
)]

use std::fs::File;
use std::io::Read;

use candle_core::{DType, Result, bail};

/// Where one tensor lies in the file: its dtype, shape and byte range after the header.
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub start: u64,
    pub end: u64,
}

/// A shard's tensors (name and where it lies, in file order) and where their data begins.
pub type Header = (Vec<(String, TensorInfo)>, u64);

/// The file's header (tensor name → where it lies, in file order) and where its data begins;
/// `None` when a tensor has a dtype this loader does not take. Checked as safetensors checks
/// it: sizes match shapes, the tensors tile the data without gaps or overlaps, up to the end
/// of the file.
pub fn read_header(file: &mut File) -> Result<Option<Header>> {
    let file_len = file.metadata()?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    let data_start = len
        .checked_add(8)
        .filter(|&s| s <= file_len && len <= 100 << 20);
    let Some(data_start) = data_start else {
        bail!("safetensors header of {len} bytes in a file of {file_len}");
    };
    let mut json = vec![0u8; usize::try_from(len).map_err(candle_core::Error::wrap)?];
    file.read_exact(&mut json)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(candle_core::Error::wrap)?;
    let mut tensors = Vec::with_capacity(header.len());
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = match v["dtype"].as_str() {
            Some("BF16") => DType::BF16,
            Some("F16") => DType::F16,
            Some("F32") => DType::F32,
            _ => return Ok(None),
        };
        let numbers = |key: &str| -> Option<Vec<u64>> {
            v[key]
                .as_array()?
                .iter()
                .map(serde_json::Value::as_u64)
                .collect()
        };
        let (Some(shape), Some(offsets)) = (numbers("shape"), numbers("data_offsets")) else {
            bail!("{name}: malformed header entry {v}");
        };
        let [start, end] = offsets[..] else {
            bail!("{name}: data_offsets {offsets:?}");
        };
        let shape: Vec<usize> = shape
            .iter()
            .map(|&d| usize::try_from(d).map_err(candle_core::Error::wrap))
            .collect::<Result<_>>()?;
        let bytes = shape
            .iter()
            .try_fold(dtype.size_in_bytes(), |n, &d| n.checked_mul(d))
            .and_then(|n| u64::try_from(n).ok());
        if bytes.is_none() || end.checked_sub(start) != bytes {
            bail!("{name}: {shape:?} {dtype:?} against data offsets {start}..{end}");
        }
        tensors.push((
            name,
            TensorInfo {
                dtype,
                shape,
                start,
                end,
            },
        ));
    }
    // In file order (also the order to read it in), tiling the data up to the file's end.
    tensors.sort_by_key(|(_, t)| t.start);
    let mut at = 0;
    for (name, t) in &tensors {
        if t.start != at {
            bail!("{name}: data from {} where {at} was expected", t.start);
        }
        at = t.end;
    }
    if data_start.checked_add(at) != Some(file_len) {
        bail!(
            "tensor data ends at {at}, the file's at {}",
            file_len - data_start
        );
    }
    Ok(Some((tensors, data_start)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `header` (JSON) then `data` zero bytes, read back through [`read_header`].
    fn parse(header: &str, data: usize) -> Result<Option<Header>> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "helexa-header-{}-{}.safetensors",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let len = u64::try_from(header.len()).expect("len");
        let bytes = [&len.to_le_bytes()[..], header.as_bytes(), &vec![0u8; data]].concat();
        std::fs::write(&path, bytes).expect("write");
        let parsed = read_header(&mut File::open(&path).expect("open"));
        std::fs::remove_file(&path).expect("remove");
        parsed
    }

    #[test]
    fn the_fixture_header_tiles_its_data() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/tiny-qwen3/model.safetensors");
        let mut file = File::open(&path).expect("fixture");
        let (tensors, data_start) = read_header(&mut file)
            .expect("header")
            .expect("float dtypes");
        assert!(!tensors.is_empty());
        let len = file.metadata().expect("metadata").len();
        assert_eq!(data_start + tensors.last().expect("a tensor").1.end, len);
        assert!(tensors.windows(2).all(|w| w[0].1.end == w[1].1.start));
    }

    #[test]
    fn malformed_headers_are_refused_and_other_dtypes_left_to_candle() {
        let ok = r#"{"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"__metadata__":{"x":"y"}}"#;
        let (tensors, _) = parse(ok, 12).expect("valid").expect("bf16");
        assert_eq!(tensors.len(), 1);
        assert_eq!(
            (tensors[0].1.shape.clone(), tensors[0].1.dtype),
            (vec![2, 3], DType::BF16)
        );
        // Integer tensors: not staged, nothing refused.
        let ints = r#"{"a":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}"#;
        assert!(parse(ints, 16).expect("valid").is_none());
        for (what, header, data) in [
            (
                "size against shape",
                r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,12]}}"#,
                12,
            ),
            (
                "overflowing shape",
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#,
                0,
            ),
            (
                "gap",
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                8,
            ),
            (
                "overlap",
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
            ),
            (
                "past the end",
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                8,
            ),
            (
                "short of the end",
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                8,
            ),
            ("no offsets", r#"{"a":{"dtype":"F32","shape":[1]}}"#, 4),
        ] {
            assert!(parse(header, data).is_err(), "{what} accepted");
        }
    }
}
