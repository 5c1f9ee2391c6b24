//! Inert answers to the few WASI calls language runtimes make before any policy code runs.
//!
//! Policies get no capabilities (no files, network, clock or environment), and every WASI
//! import a component brings is otherwise linked to a function that traps. Two kinds of call
//! are answered instead, because they are made by runtimes rather than by policy logic and
//! answering them leaks nothing:
//!
//! - `wasi:cli/environment`: an empty environment, no arguments, no working directory.
//!   CPython (componentize-py) reads its environment while starting.
//! - `wasi:random/{random,insecure,insecure-seed}`: a fixed, seeded byte stream, so a policy
//!   stays a deterministic function of its inputs. Rust std's `HashMap::new()` seeds its
//!   `RandomState` here, CPython its string hashing. Nothing secret is derived from these
//!   bytes inside a policy; if a policy ever needs real entropy, that is a new WIT import.
//!
//! Any `0.2.x` version of these interfaces is answered, under the name the component imports.

use wasmtime::component::Linker;

use crate::host::HostState;

/// Largest `get-random-bytes` answer; a guest asking for more traps instead of making the
/// host allocate on its behalf.
const MAX_RANDOM_BYTES: u64 = 64 * 1024;

/// SplitMix64 from a fixed seed: the same bytes for every instance and every call sequence.
fn inert_bytes(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x6865_6c65_7861_0001; // "helexa" + 1
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The WASI 0.2 interfaces answered here.
const ENVIRONMENT: &str = "wasi:cli/environment@0.2.";
const RANDOM: &str = "wasi:random/random@0.2.";
const INSECURE: &str = "wasi:random/insecure@0.2.";
const INSECURE_SEED: &str = "wasi:random/insecure-seed@0.2.";

/// Whether an import is one of the interfaces answered here (not stubbed with traps).
pub(crate) fn answers(import: &str) -> bool {
    [ENVIRONMENT, RANDOM, INSECURE, INSECURE_SEED]
        .iter()
        .any(|prefix| import.starts_with(prefix))
}

fn random_bytes(len: u64) -> wasmtime::Result<Vec<u8>> {
    if len > MAX_RANDOM_BYTES {
        wasmtime::bail!("a policy asked for {len} random bytes (at most {MAX_RANDOM_BYTES})");
    }
    Ok(inert_bytes(usize::try_from(len)?))
}

fn inert_u64() -> u64 {
    u64::from_le_bytes(inert_bytes(8).try_into().unwrap_or_default())
}

/// Defines the inert functions in `linker` under the exact names `imports` uses (those
/// [`answers`] accepts; others are skipped). Exact names, not one version: the trap stubs for
/// the rest are defined per exact name too, and would shadow a semver-matched definition.
pub(crate) fn add_to_linker(
    linker: &mut Linker<HostState>,
    imports: &[String],
) -> wasmtime::Result<()> {
    for name in imports {
        let mut root = linker.root();
        if name.starts_with(ENVIRONMENT) {
            let mut environment = root.instance(name)?;
            environment.func_wrap("get-environment", |_, (): ()| {
                Ok((Vec::<(String, String)>::new(),))
            })?;
            environment.func_wrap("get-arguments", |_, (): ()| Ok((Vec::<String>::new(),)))?;
            environment.func_wrap("initial-cwd", |_, (): ()| Ok((None::<String>,)))?;
        } else if name.starts_with(RANDOM) || name.starts_with(INSECURE) {
            let (bytes, number) = if name.starts_with(RANDOM) {
                ("get-random-bytes", "get-random-u64")
            } else {
                ("get-insecure-random-bytes", "get-insecure-random-u64")
            };
            let mut random = root.instance(name)?;
            random.func_wrap(bytes, |_, (len,): (u64,)| Ok((random_bytes(len)?,)))?;
            random.func_wrap(number, |_, (): ()| Ok((inert_u64(),)))?;
        } else if name.starts_with(INSECURE_SEED) {
            root.instance(name)?
                .func_wrap("insecure-seed", |_, (): ()| {
                    Ok(((inert_u64(), inert_u64().rotate_left(32)),))
                })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_fixed_and_prefixes_agree() {
        let long = inert_bytes(37);
        assert_eq!(inert_bytes(37), long);
        assert_eq!(inert_bytes(5)[..], long[..5]);
        assert!(long.iter().any(|&b| b != 0));
    }

    #[test]
    fn oversized_requests_trap() {
        assert_eq!(random_bytes(16).expect("small").len(), 16);
        assert!(random_bytes(MAX_RANDOM_BYTES + 1).is_err());
    }
}
