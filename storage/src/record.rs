//! Record framing shared by the WAL and the manifest.
//!
//! ```text
//! record  = crc u32 LE | len u32 LE | type u8 | payload (len bytes)
//! crc     = CRC-32 (IEEE) of (len LE, type, payload), started from seed(file number)
//! type    = 1 (full record); 0 is never written (zeroed space is not a record)
//! ```
//!
//! The seed ties each record to the file it was written in, so a stale or misplaced record
//! fails its check. Records are written whole, one per WAL batch or manifest edit.
//!
//! Reading stops at the first record that fails (short header, short payload, bad length, bad
//! type, bad checksum). In a file whose tail may be torn (the newest WAL segment, the manifest
//! being recovered) that failure is a *torn tail* when the record is incomplete (its header or
//! payload runs past the end of the file) or everything from it to the end is zero bytes, and
//! no valid record starts anywhere after it: the file is valid up to that offset and the
//! caller truncates it there. Anything else — a complete record with a bad checksum, a failure
//! followed by a valid record, any failure in a file that cannot have a torn tail — is
//! [`crate::Error::Corruption`] at that offset. A last record that looks incomplete but whose
//! checksum matches when its length is taken as "the rest of the file" had its length field
//! damaged: that is corruption too, not a torn write.

use std::path::Path;

use crate::limits::RECORD_BYTES_MAX;
use crate::{Error, Result};

/// Bytes of a record header.
pub const HEADER_BYTES: usize = 4 + 4 + 1;
const TYPE_FULL: u8 = 1;

fn seed(file_num: u64) -> u32 {
    (file_num as u32) ^ ((file_num >> 32) as u32) ^ 0x5157_4c31
}

fn checksum(file_num: u64, len: u32, ty: u8, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(seed(file_num));
    h.update(&len.to_le_bytes());
    h.update(&[ty]);
    h.update(payload);
    h.finalize()
}

/// Appends one framed record to `out`.
pub fn encode(file_num: u64, payload: &[u8], out: &mut Vec<u8>) {
    assert!(payload.len() <= RECORD_BYTES_MAX, "record over the limit reached the encoder");
    let len = payload.len() as u32;
    out.extend_from_slice(&checksum(file_num, len, TYPE_FULL, payload).to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.push(TYPE_FULL);
    out.extend_from_slice(payload);
}

const TRUNCATED_HEADER: &str = "truncated record header";
const TRUNCATED_PAYLOAD: &str = "truncated record payload";

/// Decodes the record at `off`: its payload range, or why it is not a record.
fn decode_at(file_num: u64, buf: &[u8], off: usize) -> std::result::Result<(usize, usize), &'static str> {
    let Some(h) = buf.get(off..off + HEADER_BYTES) else { return Err(TRUNCATED_HEADER) };
    let crc = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let ty = h[8];
    if ty != TYPE_FULL {
        return Err("unknown record type");
    }
    if len as usize > RECORD_BYTES_MAX {
        return Err("record length over limit");
    }
    let start = off + HEADER_BYTES;
    let Some(payload) = buf.get(start..start + len as usize) else { return Err(TRUNCATED_PAYLOAD) };
    if checksum(file_num, len, ty, payload) != crc {
        return Err("record checksum mismatch");
    }
    Ok((start, start + len as usize))
}

/// The records of one file.
#[derive(Debug)]
pub struct Records<'a> {
    /// `(offset of the record, payload)` for each valid record, in order.
    pub records: Vec<(u64, &'a [u8])>,
    /// Bytes of the file that hold valid records; less than the file's length after a torn tail.
    pub valid_len: u64,
}

/// Splits `buf` (the whole file `path`) into records. With `tail_may_be_torn`, a failing record
/// followed by no valid record ends the file; otherwise any failure is corruption.
pub fn read_all<'a>(path: &Path, file_num: u64, buf: &'a [u8], tail_may_be_torn: bool) -> Result<Records<'a>> {
    let mut records = Vec::new();
    let mut off = 0usize;
    while off < buf.len() {
        match decode_at(file_num, buf, off) {
            Ok((start, end)) => {
                records.push((off as u64, &buf[start..end]));
                off = end;
            }
            Err(what) => {
                let damaged_len = what == TRUNCATED_PAYLOAD && {
                    let rest = buf.len() - off - HEADER_BYTES;
                    let h = &buf[off..off + HEADER_BYTES];
                    let crc = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
                    checksum(file_num, rest as u32, h[8], &buf[off + HEADER_BYTES..]) == crc
                };
                let incomplete = (what == TRUNCATED_HEADER || what == TRUNCATED_PAYLOAD) && !damaged_len;
                let zeroed = buf[off..].iter().all(|&b| b == 0);
                let later_valid = (off + 1..buf.len()).any(|o| decode_at(file_num, buf, o).is_ok());
                if tail_may_be_torn && (incomplete || zeroed) && !later_valid {
                    break;
                }
                return Err(Error::corruption(path, off as u64, what));
            }
        }
    }
    Ok(Records { records, valid_len: off as u64 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n {
            encode(7, format!("record {i}").as_bytes(), &mut out);
        }
        out
    }

    #[test]
    fn known_bytes() {
        let mut out = Vec::new();
        encode(1, b"ab", &mut out);
        assert_eq!(&out[4..], &[2, 0, 0, 0, 1, b'a', b'b']);
        assert_eq!(u32::from_le_bytes([out[0], out[1], out[2], out[3]]), checksum(1, 2, 1, b"ab"));
    }

    #[test]
    fn every_truncation_is_a_torn_tail() {
        let buf = file(5);
        for cut in 0..buf.len() {
            let r = read_all(Path::new("w"), 7, &buf[..cut], true).expect("torn tail tolerated");
            assert!(r.valid_len as usize <= cut);
            assert!(r.records.len() <= 5);
            assert!(read_all(Path::new("w"), 7, &buf[..cut], false).is_err() || r.valid_len as usize == cut);
        }
    }

    #[test]
    fn flip_in_the_middle_is_corruption_and_names_the_offset() {
        let buf = file(5);
        let second = HEADER_BYTES + "record 0".len();
        let mut bad = buf.clone();
        bad[second + HEADER_BYTES + 1] ^= 0x40;
        match read_all(Path::new("w"), 7, &bad, true) {
            Err(Error::Corruption { offset, .. }) => assert_eq!(offset, second as u64),
            other => panic!("expected corruption, got {other:?}"),
        }
        // A complete last record with a bad checksum is corruption too, not a torn tail.
        let mut bad = buf.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(read_all(Path::new("w"), 7, &bad, true).is_err());
        // A damaged length in the last record is not mistaken for a torn write.
        let mut bad = buf.clone();
        let last = bad.len() - (HEADER_BYTES + "record 4".len());
        bad[last + 5] ^= 0x01;
        assert!(read_all(Path::new("w"), 7, &bad, true).is_err());
        // Zeroes after the last record (a crash after the size grew, before the data landed).
        let mut zeroed = buf.clone();
        zeroed.extend_from_slice(&[0; 100]);
        assert_eq!(read_all(Path::new("w"), 7, &zeroed, true).expect("torn").records.len(), 5);
        // Records from another file do not verify.
        assert!(read_all(Path::new("w"), 8, &buf, false).is_err());
    }
}
