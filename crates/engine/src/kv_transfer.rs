//! KV blocks on the wire: the compact binary format in which one worker hands the blocks it
//! computed for a prompt to another (disaggregated prefill and decode).
//!
//! A stream is a header, one frame per block, and an end frame; every integer little-endian:
//!
//! ```text
//! header = "LMKV" | version u16 | dtype u8 | 0 u8 | model u64 | layers u32 | kv_dim u32
//!        | block_size u32 | first u32 | crc32 u32                              (36 bytes)
//! block  = 'B' | route u64 | tokens [u32; block_size]
//!        | values [u16; layers * 2 * block_size * kv_dim] | crc32 u32
//! end    = 'E' | blocks u32 | crc32 u32
//! ```
//!
//! `values` is the cache's own layout, layer by layer: the layer's keys channel-major, then its
//! values slot by slot (`KvCache::read_block`), as IEEE half floats. `first` is the index of the
//! stream's first block in the prompt (the receiver may already hold the blocks before it);
//! `route` is the block's routing hash (`lastmile_protocol::block_hash`). Each frame carries a
//! CRC-32 of its own bytes, so a cut or corrupted transfer is an error, never wrong keys and
//! values, and the end frame's count tells a stream cut between frames from a complete one.
//!
//! The reader is told the layout it expects (its own model's) and refuses any other before it
//! reads a block, so every frame size is known up front: a hostile header cannot make it buffer
//! without bound. Whether the tokens are the receiver's own is for the importer to check.

use std::fmt;

use thiserror::Error;

/// The format's version; a reader refuses others.
pub const WIRE_VERSION: u16 = 1;
const MAGIC: [u8; 4] = *b"LMKV";
const HEADER_BYTES: usize = 36;
const BLOCK_TAG: u8 = b'B';
const END_TAG: u8 = b'E';
const END_BYTES: usize = 9;
/// Element type code of IEEE half floats (the only cache dtype so far).
const DTYPE_F16: u8 = 1;

/// What the two sides of a transfer must agree on for blocks to be usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Fingerprint of the model (and the name it is served under): blocks of another model are
    /// refused.
    pub model: u64,
    /// Transformer layers.
    pub layers: u32,
    /// Values per token per layer, keys or values (KV heads x head dimension).
    pub kv_dim: u32,
    /// Tokens per block.
    pub block_size: u32,
}

impl KvLayout {
    /// Half floats one block carries (keys and values of every layer).
    pub fn block_values(&self) -> usize {
        self.layers as usize * 2 * self.block_size as usize * self.kv_dim as usize
    }

    /// Bytes of one block frame.
    pub fn block_frame_bytes(&self) -> usize {
        1 + 8 + 4 * self.block_size as usize + 2 * self.block_values() + 4
    }

    /// Bytes of a whole stream of `blocks` blocks (header, frames, end).
    pub fn stream_bytes(&self, blocks: usize) -> usize {
        HEADER_BYTES + blocks * self.block_frame_bytes() + END_BYTES
    }
}

impl fmt::Display for KvLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "model {:016x}, {} layers, kv_dim {}, blocks of {}",
            self.model, self.layers, self.kv_dim, self.block_size
        )
    }
}

/// One full block of a prompt: its routing hash, its tokens and its keys and values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvBlock {
    /// Routing hash of the block (chained over every block before it).
    pub route: u64,
    /// Its `block_size` tokens.
    pub tokens: Vec<u32>,
    /// Keys and values, [`KvLayout::block_values`] half floats (raw bits).
    pub values: Vec<u16>,
}

/// Why a KV stream was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KvWireError {
    /// It does not start with the format's magic bytes.
    #[error("not a KV block stream")]
    BadMagic,
    /// A version this reader does not speak.
    #[error("KV stream version {0}, this reader speaks {WIRE_VERSION}")]
    Version(u16),
    /// Blocks of another model, dtype or shape.
    #[error("KV stream of another layout: expected {expected}, got {got}")]
    Layout {
        /// The receiver's layout.
        expected: KvLayout,
        /// The stream's.
        got: KvLayout,
    },
    /// A cache element type this reader does not know.
    #[error("KV stream dtype {0} is not supported")]
    Dtype(u8),
    /// A frame's checksum does not match its bytes (frame 0 is the header).
    #[error("KV stream frame {frame} is corrupt (checksum mismatch)")]
    Checksum {
        /// Which frame: 0 the header, then blocks from 1, then the end frame.
        frame: usize,
    },
    /// A frame of a kind the format does not have.
    #[error("unknown KV stream frame tag {0:#04x}")]
    UnknownFrame(u8),
    /// The end frame counts other blocks than were sent.
    #[error("KV stream ended claiming {claimed} blocks after {sent}")]
    Count {
        /// Blocks the end frame claims.
        claimed: u32,
        /// Blocks received.
        sent: usize,
    },
    /// Bytes after the end frame.
    #[error("bytes after the end of the KV stream")]
    Trailing,
    /// The stream stopped before its end frame.
    #[error("the KV stream was cut short after {blocks} blocks")]
    Truncated {
        /// Whole blocks received.
        blocks: usize,
    },
}

impl KvWireError {
    /// A short, stable label for metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::BadMagic | Self::Version(_) | Self::UnknownFrame(_) | Self::Trailing => {
                "malformed"
            }
            Self::Layout { .. } | Self::Dtype(_) => "layout",
            Self::Checksum { .. } => "checksum",
            Self::Count { .. } | Self::Truncated { .. } => "truncated",
        }
    }
}

/// The header of a stream of blocks in `layout`, the first being block `first` of its prompt.
pub fn encode_header(layout: &KvLayout, first: u32, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&WIRE_VERSION.to_le_bytes());
    out.extend_from_slice(&[DTYPE_F16, 0]);
    out.extend_from_slice(&layout.model.to_le_bytes());
    for v in [layout.layers, layout.kv_dim, layout.block_size, first] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    seal(out, start);
}

/// One block's frame (`block` must match the header's layout).
pub fn encode_block(block: &KvBlock, out: &mut Vec<u8>) {
    let start = out.len();
    out.reserve(1 + 8 + 4 * block.tokens.len() + 2 * block.values.len() + 4);
    out.push(BLOCK_TAG);
    out.extend_from_slice(&block.route.to_le_bytes());
    for t in &block.tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    for v in &block.values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    seal(out, start);
}

/// The end frame of a stream of `blocks` blocks.
pub fn encode_end(blocks: u32, out: &mut Vec<u8>) {
    let start = out.len();
    out.push(END_TAG);
    out.extend_from_slice(&blocks.to_le_bytes());
    seal(out, start);
}

/// A whole stream: `blocks`, the first being block `first` of its prompt, in `layout`.
pub fn encode_stream(layout: &KvLayout, first: u32, blocks: &[KvBlock]) -> Vec<u8> {
    let mut out = Vec::with_capacity(layout.stream_bytes(blocks.len()));
    encode_header(layout, first, &mut out);
    for b in blocks {
        encode_block(b, &mut out);
    }
    encode_end(blocks.len() as u32, &mut out);
    out
}

/// Appends the CRC-32 of `out[start..]`.
fn seal(out: &mut Vec<u8>, start: usize) {
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

fn sealed(frame: &[u8]) -> bool {
    let (body, crc) = frame.split_at(frame.len() - 4);
    crc.try_into()
        .is_ok_and(|c| crc32fast::hash(body) == u32::from_le_bytes(c))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Reads a stream as its bytes arrive, yielding each block once its frame is whole and checked.
pub struct KvStreamReader {
    expected: KvLayout,
    buf: Vec<u8>,
    /// The header's `first`, once read.
    first: Option<u32>,
    blocks: usize,
    ended: bool,
}

impl KvStreamReader {
    /// A reader of blocks in `expected` (the receiver's layout; any other is refused).
    pub fn new(expected: KvLayout) -> Self {
        Self {
            expected,
            buf: Vec::new(),
            first: None,
            blocks: 0,
            ended: false,
        }
    }

    /// The index in its prompt of the stream's first block (once the header has arrived).
    pub fn first(&self) -> Option<u32> {
        self.first
    }

    /// Takes the next bytes of the stream; returns the blocks they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<KvBlock>, KvWireError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut at = 0;
        let result = loop {
            match self.frame(&buf[at..]) {
                Ok(Some((used, block))) => {
                    at += used;
                    out.extend(block);
                }
                Ok(None) => break Ok(out),
                Err(e) => break Err(e),
            }
        };
        buf.drain(..at);
        self.buf = buf;
        result
    }

    /// The stream is over: it must have ended with its end frame, and nothing after it.
    pub fn finish(&self) -> Result<usize, KvWireError> {
        if !self.ended {
            return Err(KvWireError::Truncated {
                blocks: self.blocks,
            });
        }
        Ok(self.blocks)
    }

    /// Parses one frame at the start of `b`: `None` while it is incomplete, else the bytes it
    /// took and the block it held (if a block frame).
    fn frame(&mut self, b: &[u8]) -> Result<Option<(usize, Option<KvBlock>)>, KvWireError> {
        if b.is_empty() {
            return Ok(None);
        }
        if self.ended {
            return Err(KvWireError::Trailing);
        }
        if self.first.is_none() {
            return self.header(b).map(|used| used.map(|u| (u, None)));
        }
        match b[0] {
            BLOCK_TAG => {
                let len = self.expected.block_frame_bytes();
                if b.len() < len {
                    return Ok(None);
                }
                let frame = &b[..len];
                self.blocks += 1;
                if !sealed(frame) {
                    return Err(KvWireError::Checksum { frame: self.blocks });
                }
                let bs = self.expected.block_size as usize;
                let tokens = (0..bs).map(|i| u32_at(frame, 9 + 4 * i)).collect();
                let values = frame[9 + 4 * bs..len - 4]
                    .chunks_exact(2)
                    .map(|v| u16::from_le_bytes([v[0], v[1]]))
                    .collect();
                let block = KvBlock {
                    route: u64_at(frame, 1),
                    tokens,
                    values,
                };
                Ok(Some((len, Some(block))))
            }
            END_TAG => {
                if b.len() < END_BYTES {
                    return Ok(None);
                }
                if !sealed(&b[..END_BYTES]) {
                    return Err(KvWireError::Checksum {
                        frame: self.blocks + 1,
                    });
                }
                let claimed = u32_at(b, 1);
                if claimed as usize != self.blocks {
                    return Err(KvWireError::Count {
                        claimed,
                        sent: self.blocks,
                    });
                }
                self.ended = true;
                Ok(Some((END_BYTES, None)))
            }
            tag => Err(KvWireError::UnknownFrame(tag)),
        }
    }

    fn header(&mut self, b: &[u8]) -> Result<Option<usize>, KvWireError> {
        if b[..b.len().min(4)] != MAGIC[..b.len().min(4)] {
            return Err(KvWireError::BadMagic);
        }
        if b.len() < HEADER_BYTES {
            return Ok(None);
        }
        let h = &b[..HEADER_BYTES];
        if !sealed(h) {
            return Err(KvWireError::Checksum { frame: 0 });
        }
        let version = u16::from_le_bytes([h[4], h[5]]);
        if version != WIRE_VERSION {
            return Err(KvWireError::Version(version));
        }
        if h[6] != DTYPE_F16 {
            return Err(KvWireError::Dtype(h[6]));
        }
        let got = KvLayout {
            model: u64_at(h, 8),
            layers: u32_at(h, 16),
            kv_dim: u32_at(h, 20),
            block_size: u32_at(h, 24),
        };
        if got != self.expected {
            return Err(KvWireError::Layout {
                expected: self.expected,
                got,
            });
        }
        self.first = Some(u32_at(h, 28));
        Ok(Some(HEADER_BYTES))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            model: 0xfeed,
            layers: 2,
            kv_dim: 3,
            block_size: 4,
        }
    }

    fn block(seed: u16) -> KvBlock {
        let l = layout();
        KvBlock {
            route: 1000 + u64::from(seed),
            tokens: (0..4).map(|t| u32::from(seed) * 10 + t).collect(),
            values: (0..l.block_values() as u16).map(|v| v ^ seed).collect(),
        }
    }

    fn stream(blocks: &[KvBlock], first: u32) -> Vec<u8> {
        let mut out = Vec::new();
        encode_header(&layout(), first, &mut out);
        for b in blocks {
            encode_block(b, &mut out);
        }
        encode_end(blocks.len() as u32, &mut out);
        out
    }

    #[test]
    fn blocks_survive_the_round_trip_in_any_split_of_the_bytes() {
        let blocks = [block(1), block(2), block(3)];
        let bytes = stream(&blocks, 5);
        assert_eq!(
            bytes.len(),
            HEADER_BYTES + 3 * layout().block_frame_bytes() + END_BYTES
        );
        for piece in [1, 7, 36, 100, bytes.len()] {
            let mut r = KvStreamReader::new(layout());
            let mut got = Vec::new();
            for chunk in bytes.chunks(piece) {
                got.extend(r.push(chunk).expect("valid stream"));
            }
            assert_eq!(got, blocks, "pieces of {piece} bytes");
            assert_eq!(r.first(), Some(5));
            assert_eq!(r.finish(), Ok(3));
        }
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let bytes = stream(&[block(1), block(2)], 0);
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x20;
            let mut r = KvStreamReader::new(layout());
            let outcome = r.push(&bad).and_then(|_| r.finish());
            assert!(outcome.is_err(), "a flip at byte {at} went unnoticed");
        }
    }

    #[test]
    fn a_stream_cut_anywhere_is_truncated_not_complete() {
        let bytes = stream(&[block(1), block(2)], 0);
        for cut in 0..bytes.len() {
            let mut r = KvStreamReader::new(layout());
            r.push(&bytes[..cut]).expect("a valid prefix");
            assert!(
                matches!(r.finish(), Err(KvWireError::Truncated { .. })),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn another_layout_is_refused_before_any_block() {
        let mut other = layout();
        other.kv_dim = 1 << 30;
        let mut bytes = Vec::new();
        encode_header(&other, 0, &mut bytes);
        let mut r = KvStreamReader::new(layout());
        let e = r.push(&bytes).expect_err("other layout");
        assert_eq!(e.error_type(), "layout");
        let mut r = KvStreamReader::new(layout());
        assert_eq!(r.push(b"GET / HTTP/1.1"), Err(KvWireError::BadMagic));
    }

    #[test]
    fn an_end_frame_that_miscounts_and_bytes_after_it_are_refused() {
        let mut bytes = Vec::new();
        encode_header(&layout(), 0, &mut bytes);
        encode_block(&block(1), &mut bytes);
        encode_end(2, &mut bytes);
        let mut r = KvStreamReader::new(layout());
        assert_eq!(
            r.push(&bytes),
            Err(KvWireError::Count {
                claimed: 2,
                sent: 1
            })
        );
        let mut ok = stream(&[block(1)], 0);
        ok.push(0);
        let mut r = KvStreamReader::new(layout());
        assert_eq!(r.push(&ok), Err(KvWireError::Trailing));
    }
}
