//! The wire encoding of frames. Bincode 2 (serde mode, fixed config, size limit) lives here and
//! nowhere else, so the encoding can be swapped without touching any caller.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Error, Result, MAX_FRAME_BYTES};

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<MAX_FRAME_BYTES>()
}

/// Encodes `value`; fails if the result would exceed [`MAX_FRAME_BYTES`].
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let bytes =
        bincode::serde::encode_to_vec(value, config()).map_err(|e| Error::Encode(e.to_string()))?;
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(Error::Oversize {
            len: bytes.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    Ok(bytes)
}

/// Decodes one whole value from `bytes`; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(Error::Oversize {
            len: bytes.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| Error::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(Error::Decode(format!(
            "{} trailing bytes after a {}-byte frame",
            bytes.len() - used,
            used
        )));
    }
    Ok(value)
}
