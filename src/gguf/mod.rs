//! GGUF files (llama.cpp's model format), versions 2 and 3: reading the
//! header, metadata and tensor table, dequantizing tensors to f32, and
//! writing F32 / F16 / Q8_0 files.
//!
//! The layout follows llama.cpp's `gguf.h` / gguf-py (`gguf/constants.py`,
//! `gguf_reader.py`, `gguf_writer.py`), all little-endian:
//!
//! ```text
//! "GGUF" | version: u32 | tensor_count: u64 | kv_count: u64
//! kv_count x { key: string | value_type: u32 | value }
//! tensor_count x { name: string | n_dims: u32 | dims: [u64; n_dims]
//!                  | ggml_type: u32 | offset: u64 }
//! zero padding to `general.alignment` (default 32)
//! tensor data; each tensor at data_start + offset, offsets aligned
//! ```
//!
//! A string is a u64 byte length and UTF-8 bytes; an array is an element
//! type (u32), a u64 count and the elements. `dims` run fastest axis
//! first, the reverse of PyTorch's shape. Block layouts of the tensor types
//! are in [`quants`]. Nested arrays are refused on read and write, as
//! llama.cpp does.
//!
//! Everything read from a file is checked before it is trusted: counts and
//! lengths against the bytes left in the file (so no absurd allocation),
//! every tensor's bytes against the end of the file (so a truncated file is
//! refused at [`GgufFile::open`], naming the tensor), and unknown tensor
//! types at open. Every error message starts with the file's path.

pub mod quants;

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The first four bytes of every GGUF file.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The version [`write()`] produces.
pub const VERSION: u32 = 3;
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that overrides the data alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// llama.cpp's `GGML_MAX_DIMS`.
const MAX_DIMS: u64 = 4;
/// llama.cpp refuses tensor names of `GGML_MAX_NAME` (64) bytes or more.
const MAX_NAME_BYTES: usize = 63;
const READ_TYPES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K";
const WRITE_TYPES: &str = "F32, F16 and Q8_0";

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{}: {context}: {source}", path.display())]
    Io {
        path: PathBuf,
        context: String,
        source: std::io::Error,
    },
    /// The file is not a well-formed GGUF file posttrain can read.
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },
    #[error(
        "{}: tensor `{tensor}` has type {kind}; posttrain reads {READ_TYPES}",
        path.display()
    )]
    UnsupportedType {
        path: PathBuf,
        tensor: String,
        kind: GgmlType,
    },
    #[error("{}: no tensor named `{name}`", path.display())]
    MissingTensor { path: PathBuf, name: String },
    /// [`write()`] was given something it cannot write.
    #[error("{}: cannot write: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

fn io_error(path: &Path, context: impl Into<String>) -> impl FnOnce(std::io::Error) -> GgufError {
    let path = path.to_path_buf();
    let context = context.into();
    move |source| GgufError::Io {
        path,
        context,
        source,
    }
}

fn format_error(path: &Path, message: impl Into<String>) -> GgufError {
    GgufError::Format {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> GgufError {
    GgufError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------- values

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    /// All elements of one type; never nested.
    Array(Vec<Value>),
}

/// GGUF's value type ids (`GGUFValueType`).
mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

impl Value {
    /// Any integer that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any float or integer (64-bit integers beyond 2^53 rounded).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => value_type::U8,
            Value::I8(_) => value_type::I8,
            Value::U16(_) => value_type::U16,
            Value::I16(_) => value_type::I16,
            Value::U32(_) => value_type::U32,
            Value::I32(_) => value_type::I32,
            Value::U64(_) => value_type::U64,
            Value::I64(_) => value_type::I64,
            Value::F32(_) => value_type::F32,
            Value::F64(_) => value_type::F64,
            Value::Bool(_) => value_type::BOOL,
            Value::String(_) => value_type::STRING,
            Value::Array(_) => value_type::ARRAY,
        }
    }
}

/// The fewest bytes a value of type `type_id` takes in a file; `None` for
/// an unknown type.
fn min_value_bytes(type_id: u32) -> Option<u64> {
    use value_type::*;
    match type_id {
        U8 | I8 | BOOL => Some(1),
        U16 | I16 => Some(2),
        U32 | I32 | F32 => Some(4),
        U64 | I64 | F64 | STRING => Some(8),
        ARRAY => Some(12),
        _ => None,
    }
}

// ---------------------------------------------------------------- tensor types

/// A ggml tensor type. Ids are ggml's (`GGMLQuantizationType`); an id this
/// table does not know is kept as `Other`.
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    Other(u32),
}

/// (type, id, name, values per block, bytes per block), from gguf-py's
/// `GGMLQuantizationType` and `GGML_QUANT_SIZES` (QK_K = 256).
const TYPES: [(GgmlType, u32, &str, u64, u64); 32] = {
    use GgmlType::*;
    [
        (F32, 0, "F32", 1, 4),
        (F16, 1, "F16", 1, 2),
        (Q4_0, 2, "Q4_0", 32, 18),
        (Q4_1, 3, "Q4_1", 32, 20),
        (Q5_0, 6, "Q5_0", 32, 22),
        (Q5_1, 7, "Q5_1", 32, 24),
        (Q8_0, 8, "Q8_0", 32, 34),
        (Q8_1, 9, "Q8_1", 32, 40),
        (Q2_K, 10, "Q2_K", 256, 84),
        (Q3_K, 11, "Q3_K", 256, 110),
        (Q4_K, 12, "Q4_K", 256, 144),
        (Q5_K, 13, "Q5_K", 256, 176),
        (Q6_K, 14, "Q6_K", 256, 210),
        (Q8_K, 15, "Q8_K", 256, 292),
        (IQ2_XXS, 16, "IQ2_XXS", 256, 66),
        (IQ2_XS, 17, "IQ2_XS", 256, 74),
        (IQ3_XXS, 18, "IQ3_XXS", 256, 98),
        (IQ1_S, 19, "IQ1_S", 256, 50),
        (IQ4_NL, 20, "IQ4_NL", 32, 18),
        (IQ3_S, 21, "IQ3_S", 256, 110),
        (IQ2_S, 22, "IQ2_S", 256, 82),
        (IQ4_XS, 23, "IQ4_XS", 256, 136),
        (I8, 24, "I8", 1, 1),
        (I16, 25, "I16", 1, 2),
        (I32, 26, "I32", 1, 4),
        (I64, 27, "I64", 1, 8),
        (F64, 28, "F64", 1, 8),
        (IQ1_M, 29, "IQ1_M", 256, 56),
        (BF16, 30, "BF16", 1, 2),
        (TQ1_0, 34, "TQ1_0", 256, 54),
        (TQ2_0, 35, "TQ2_0", 256, 66),
        (MXFP4, 39, "MXFP4", 32, 17),
    ]
};

impl GgmlType {
    pub fn from_id(id: u32) -> GgmlType {
        TYPES
            .iter()
            .find(|t| t.1 == id)
            .map_or(GgmlType::Other(id), |t| t.0)
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::Other(id) => id,
            known => Self::entry(known).map_or(u32::MAX, |t| t.1),
        }
    }

    /// ggml's name ("Q4_K"); "unknown" for `Other`.
    pub fn name(self) -> &'static str {
        Self::entry(self).map_or("unknown", |t| t.2)
    }

    /// Values per block (1 for the scalar types); `None` for `Other`.
    pub fn block_size(self) -> Option<u64> {
        Self::entry(self).map(|t| t.3)
    }

    /// Bytes per block; `None` for `Other`.
    pub fn block_bytes(self) -> Option<u64> {
        Self::entry(self).map(|t| t.4)
    }

    /// Whether [`GgufFile::tensor_f32`] can read tensors of this type.
    pub fn is_readable(self) -> bool {
        block_fn(self).is_some()
    }

    fn entry(self) -> Option<&'static (GgmlType, u32, &'static str, u64, u64)> {
        TYPES.iter().find(|t| t.0 == self)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgmlType::Other(id) => write!(f, "unknown ggml type id {id}"),
            known => f.write_str(known.name()),
        }
    }
}

/// The function that dequantizes one block of `kind`, if posttrain reads it.
fn block_fn(kind: GgmlType) -> Option<quants::BlockFn> {
    use GgmlType::*;
    let f: quants::BlockFn = match kind {
        F32 => quants::dequant_f32,
        F16 => quants::dequant_f16,
        BF16 => quants::dequant_bf16,
        Q8_0 => quants::dequant_q8_0,
        Q4_0 => quants::dequant_q4_0,
        Q4_1 => quants::dequant_q4_1,
        Q4_K => quants::dequant_q4_k,
        Q5_K => quants::dequant_q5_k,
        Q6_K => quants::dequant_q6_k,
        _ => return None,
    };
    Some(f)
}

// ---------------------------------------------------------------- tensors

/// One entry of a file's tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: fastest-varying axis first.
    pub dims: Vec<u64>,
    pub kind: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The shape in PyTorch order (slowest axis first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// The number of values (saturating at `u64::MAX`; a tensor from
    /// [`GgufFile::open`] never overflows).
    pub fn n_elements(&self) -> u64 {
        self.checked_elements().unwrap_or(u64::MAX)
    }

    /// Bytes of data: `None` for an `Other` type, rows that are not whole
    /// blocks, or overflow (never for a tensor from [`GgufFile::open`]).
    pub fn n_bytes(&self) -> Option<u64> {
        let block = self.kind.block_size()?;
        let row = self.dims.first().copied().unwrap_or(1);
        if !row.is_multiple_of(block) {
            return None;
        }
        (self.checked_elements()? / block).checked_mul(self.kind.block_bytes()?)
    }

    fn checked_elements(&self) -> Option<u64> {
        self.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
    }
}

// ---------------------------------------------------------------- reading

/// An opened GGUF file: its metadata and tensor table (tensor data is read
/// on demand).
#[derive(Debug, Clone)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    /// In file order.
    pub metadata: Vec<(String, Value)>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    alignment: u64,
    data_start: u64,
    file_len: u64,
}

impl GgufFile {
    /// Reads and checks the header, metadata and tensor table.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let file = File::open(path).map_err(io_error(path, "cannot open"))?;
        let file_len = file
            .metadata()
            .map_err(io_error(path, "cannot read the file's size"))?
            .len();
        let mut header = Header {
            input: BufReader::new(file),
            pos: 0,
            len: file_len,
            path,
        };
        let version = header.preamble()?;
        let tensor_count = header.u64(&format_args!("the tensor count"))?;
        let kv_count = header.u64(&format_args!("the metadata count"))?;
        // Smallest metadata entry: empty key (8), type (4), one byte.
        header.check_count(kv_count, 13, "metadata entries")?;
        // Smallest tensor entry: empty name (8), n_dims, type, offset.
        header.check_count(tensor_count, 24, "tensors")?;
        let metadata = header.metadata(kv_count)?;
        let alignment = alignment_of(path, &metadata)?;
        let tensors = header.tensor_table(tensor_count)?;
        let data_start = align(header.pos, alignment);
        let gguf = GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            alignment,
            data_start,
            file_len,
        };
        for info in &gguf.tensors {
            gguf.check_extent(info)?;
        }
        Ok(gguf)
    }

    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The tensor table entry named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The data alignment (`general.alignment`, else 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute byte offset of the data section.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// A tensor's raw bytes, as stored.
    pub fn tensor_bytes(&self, name: &str) -> Result<Vec<u8>, GgufError> {
        let info = self.tensor(name).ok_or_else(|| GgufError::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        self.read_data(info)
    }

    /// A tensor's values as f32 (dequantized), in row-major PyTorch order.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let info = self.tensor(name).ok_or_else(|| GgufError::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        let unsupported = || GgufError::UnsupportedType {
            path: self.path.clone(),
            tensor: info.name.clone(),
            kind: info.kind,
        };
        let dequant = block_fn(info.kind).ok_or_else(unsupported)?;
        let (Some(block_size), Some(block_bytes)) =
            (info.kind.block_size(), info.kind.block_bytes())
        else {
            return Err(unsupported());
        };
        let bytes = self.read_data(info)?;
        let mut values = vec![0.0f32; info.n_elements() as usize];
        let blocks = bytes.chunks_exact(block_bytes as usize);
        for (block, out) in blocks.zip(values.chunks_exact_mut(block_size as usize)) {
            dequant(block, out);
        }
        Ok(values)
    }

    fn read_data(&self, info: &TensorInfo) -> Result<Vec<u8>, GgufError> {
        let context = || format!("reading tensor `{}`", info.name);
        let n_bytes = self.check_extent(info)?;
        let mut file = File::open(&self.path).map_err(io_error(&self.path, context()))?;
        file.seek(SeekFrom::Start(self.data_start + info.offset))
            .map_err(io_error(&self.path, context()))?;
        let mut bytes = vec![0u8; n_bytes as usize];
        file.read_exact(&mut bytes)
            .map_err(io_error(&self.path, context()))?;
        Ok(bytes)
    }

    /// Checks that `info`'s data is whole blocks, aligned, and inside the
    /// file; returns its length in bytes.
    fn check_extent(&self, info: &TensorInfo) -> Result<u64, GgufError> {
        let fail =
            |message: String| format_error(&self.path, format!("tensor `{}` {message}", info.name));
        let (Some(block), Some(_)) = (info.kind.block_size(), info.kind.block_bytes()) else {
            return Err(fail(format!("has {}", info.kind)));
        };
        let row = info.dims.first().copied().unwrap_or(1);
        if !row.is_multiple_of(block) {
            return Err(fail(format!(
                "has rows of {row} values, not whole {} blocks of {block}",
                info.kind
            )));
        }
        let n_bytes = info
            .n_bytes()
            .ok_or_else(|| fail(format!("has an impossible shape {:?}", info.dims)))?;
        if !info.offset.is_multiple_of(self.alignment) {
            return Err(fail(format!(
                "starts at data offset {}, which is not a multiple of the alignment {}",
                info.offset, self.alignment
            )));
        }
        let end = self
            .data_start
            .checked_add(info.offset)
            .and_then(|start| start.checked_add(n_bytes));
        match end {
            Some(end) if end <= self.file_len => Ok(n_bytes),
            _ => Err(fail(format!(
                "runs past the end of the file: its {n_bytes} bytes start at byte {} but the file has {} bytes (truncated?)",
                self.data_start.saturating_add(info.offset),
                self.file_len
            ))),
        }
    }
}

fn align(offset: u64, alignment: u64) -> u64 {
    offset.div_ceil(alignment) * alignment
}

/// `general.alignment` if present (a non-zero power of two), else 32.
fn alignment_of(path: &Path, metadata: &[(String, Value)]) -> Result<u64, GgufError> {
    let Some((_, value)) = metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match value.as_u64() {
        Some(a) if a.is_power_of_two() => Ok(a),
        _ => Err(format_error(
            path,
            format!("{ALIGNMENT_KEY} is {value:?}; it must be a power of two"),
        )),
    }
}

/// A label "{0} `{1}`" for error messages, formatted only on error.
struct Named<'a>(&'static str, &'a str);

impl fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} `{}`", self.0, self.1)
    }
}

/// A position-tracking reader of the header that refuses to read (or
/// allocate for) more than the file holds.
struct Header<'a> {
    input: BufReader<File>,
    pos: u64,
    len: u64,
    path: &'a Path,
}

impl Header<'_> {
    fn fail(&self, message: impl Into<String>) -> GgufError {
        format_error(self.path, message)
    }

    fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    /// Reads the magic and version; returns the version.
    fn preamble(&mut self) -> Result<u32, GgufError> {
        if self.len < 4 {
            return Err(self.fail(format!("not a GGUF file (only {} bytes)", self.len)));
        }
        let magic: [u8; 4] = self.take(&format_args!("the magic"))?;
        if magic != MAGIC {
            return Err(self.fail(format!(
                "not a GGUF file: it starts with {magic:02x?}, not \"GGUF\""
            )));
        }
        let version = self.u32(&format_args!("the version"))?;
        if version != 0 && version & 0xffff == 0 {
            return Err(self.fail(format!(
                "looks like a big-endian GGUF file (version field {version:#x}); posttrain reads little-endian files"
            )));
        }
        if version != 2 && version != 3 {
            return Err(self.fail(format!(
                "GGUF version {version} is not supported; posttrain reads versions 2 and 3"
            )));
        }
        Ok(version)
    }

    fn check_count(&self, count: u64, min_bytes: u64, what: &str) -> Result<(), GgufError> {
        if count > self.remaining() / min_bytes {
            return Err(self.fail(format!(
                "the header claims {count} {what}, more than the {}-byte file can hold",
                self.len
            )));
        }
        Ok(())
    }

    fn take<const N: usize>(&mut self, what: &dyn fmt::Display) -> Result<[u8; N], GgufError> {
        self.ensure(N as u64, what)?;
        let mut bytes = [0u8; N];
        self.input
            .read_exact(&mut bytes)
            .map_err(io_error(self.path, format!("reading {what}")))?;
        self.pos += N as u64;
        Ok(bytes)
    }

    fn ensure(&self, n: u64, what: &dyn fmt::Display) -> Result<(), GgufError> {
        if n > self.remaining() {
            return Err(self.fail(format!(
                "the header is cut short: {what} at byte {} needs {n} bytes but the file has {} bytes",
                self.pos, self.len
            )));
        }
        Ok(())
    }

    fn u32(&mut self, what: &dyn fmt::Display) -> Result<u32, GgufError> {
        self.take(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn fmt::Display) -> Result<u64, GgufError> {
        self.take(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &dyn fmt::Display) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        self.ensure(len, what)?;
        let mut bytes = vec![0u8; len as usize];
        self.input
            .read_exact(&mut bytes)
            .map_err(io_error(self.path, format!("reading {what}")))?;
        self.pos += len;
        String::from_utf8(bytes).map_err(|_| self.fail(format!("{what} is not valid UTF-8")))
    }

    fn metadata(&mut self, count: u64) -> Result<Vec<(String, Value)>, GgufError> {
        let mut entries = Vec::with_capacity(count as usize);
        let mut seen = HashSet::new();
        for i in 0..count {
            let key = self.string(&format_args!("the key of metadata entry {i}"))?;
            if !seen.insert(key.clone()) {
                return Err(self.fail(format!("metadata key `{key}` appears twice")));
            }
            let type_id = self.u32(&format_args!("the type of metadata `{key}`"))?;
            let value = self.value(type_id, &key)?;
            entries.push((key, value));
        }
        Ok(entries)
    }

    fn value(&mut self, type_id: u32, key: &str) -> Result<Value, GgufError> {
        use value_type as t;
        let what = &Named("metadata", key);
        Ok(match type_id {
            t::U8 => Value::U8(u8::from_le_bytes(self.take(what)?)),
            t::I8 => Value::I8(i8::from_le_bytes(self.take(what)?)),
            t::U16 => Value::U16(u16::from_le_bytes(self.take(what)?)),
            t::I16 => Value::I16(i16::from_le_bytes(self.take(what)?)),
            t::U32 => Value::U32(u32::from_le_bytes(self.take(what)?)),
            t::I32 => Value::I32(i32::from_le_bytes(self.take(what)?)),
            t::U64 => Value::U64(u64::from_le_bytes(self.take(what)?)),
            t::I64 => Value::I64(i64::from_le_bytes(self.take(what)?)),
            t::F32 => Value::F32(f32::from_le_bytes(self.take(what)?)),
            t::F64 => Value::F64(f64::from_le_bytes(self.take(what)?)),
            t::BOOL => Value::Bool(self.take::<1>(what)?[0] != 0),
            t::STRING => Value::String(self.string(what)?),
            t::ARRAY => self.array(key)?,
            other => {
                return Err(self.fail(format!("metadata `{key}` has unknown value type {other}")))
            }
        })
    }

    fn array(&mut self, key: &str) -> Result<Value, GgufError> {
        let elem = self.u32(&format_args!("the element type of metadata `{key}`"))?;
        if elem == value_type::ARRAY {
            return Err(self.fail(format!(
                "metadata `{key}` is an array of arrays, which GGUF readers do not support"
            )));
        }
        let min_bytes = min_value_bytes(elem).ok_or_else(|| {
            self.fail(format!(
                "metadata `{key}` is an array of unknown value type {elem}"
            ))
        })?;
        let count = self.u64(&format_args!("the length of metadata `{key}`"))?;
        self.check_count(count, min_bytes, &format!("elements in metadata `{key}`"))?;
        let mut items = Vec::with_capacity(count as usize);
        for _ in 0..count {
            items.push(self.value(elem, key)?);
        }
        Ok(Value::Array(items))
    }

    fn tensor_table(&mut self, count: u64) -> Result<Vec<TensorInfo>, GgufError> {
        let mut tensors = Vec::with_capacity(count as usize);
        let mut seen = HashSet::new();
        for i in 0..count {
            let info = self.tensor_info(i)?;
            if !seen.insert(info.name.clone()) {
                return Err(self.fail(format!("tensor `{}` appears twice", info.name)));
            }
            tensors.push(info);
        }
        Ok(tensors)
    }

    fn tensor_info(&mut self, index: u64) -> Result<TensorInfo, GgufError> {
        let name = self.string(&format_args!("the name of tensor {index}"))?;
        let what = &Named("the table entry of tensor", &name);
        let n_dims = u64::from(self.u32(what)?);
        if n_dims > MAX_DIMS {
            return Err(self.fail(format!(
                "tensor `{name}` has {n_dims} dimensions; GGUF allows at most {MAX_DIMS}"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64(what)?);
        }
        let kind = GgmlType::from_id(self.u32(what)?);
        if let GgmlType::Other(id) = kind {
            return Err(self.fail(format!("tensor `{name}` has unknown ggml type id {id}")));
        }
        let offset = self.u64(what)?;
        Ok(TensorInfo {
            name,
            dims,
            kind,
            offset,
        })
    }
}

// ---------------------------------------------------------------- writing

/// A tensor to write: values in row-major PyTorch order.
#[derive(Debug, Clone)]
pub struct WriteTensor<'a> {
    pub name: String,
    /// PyTorch order (slowest axis first), 1 to 4 axes.
    pub shape: Vec<usize>,
    pub values: &'a [f32],
    /// F32, F16 (rounded to nearest even) or Q8_0 (as llama.cpp quantizes).
    pub kind: GgmlType,
}

/// Writes a GGUF v3 file: `path.tmp` first, renamed to `path` when
/// complete. Data alignment is 32 unless `metadata` sets
/// `general.alignment` (written only then). Refused, before anything is
/// written: a type other than F32, F16 and Q8_0; Q8_0 rows (the last
/// axis) that are not a multiple of 32 values (no silent fallback: write
/// such tensors as F16 or F32); values that do not fill the shape;
/// duplicate keys or tensor names; names of 64 bytes or more; arrays mixing
/// element types or holding arrays.
pub fn write(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[WriteTensor],
) -> Result<(), GgufError> {
    let alignment = write_alignment(path, metadata)?;
    let header = encode_header(path, metadata, tensors, alignment)?;
    let tmp = tmp_path(path);
    let written = write_body(&tmp, &header, tensors, alignment);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(io_error(path, format!("renaming {}", tmp.display())))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

fn write_alignment(path: &Path, metadata: &[(String, Value)]) -> Result<u64, GgufError> {
    match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => Ok(DEFAULT_ALIGNMENT),
        Some((_, Value::U32(a))) if a.is_power_of_two() => Ok(u64::from(*a)),
        Some((_, v)) => Err(invalid(
            path,
            format!("{ALIGNMENT_KEY} must be a U32 power of two, not {v:?}"),
        )),
    }
}

fn encode_header(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[WriteTensor],
    alignment: u64,
) -> Result<Vec<u8>, GgufError> {
    let mut out = Vec::new();
    out.extend(MAGIC);
    out.extend(VERSION.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    let mut keys = HashSet::new();
    for (key, value) in metadata {
        if !keys.insert(key.as_str()) {
            return Err(invalid(path, format!("metadata key `{key}` appears twice")));
        }
        put_string(&mut out, key);
        out.extend(value.type_id().to_le_bytes());
        put_value(path, &mut out, key, value)?;
    }
    let mut names = HashSet::new();
    let mut offset = 0u64;
    for tensor in tensors {
        if !names.insert(tensor.name.as_str()) {
            return Err(invalid(
                path,
                format!("tensor `{}` appears twice", tensor.name),
            ));
        }
        let n_bytes = check_write_tensor(path, tensor)?;
        put_string(&mut out, &tensor.name);
        out.extend((tensor.shape.len() as u32).to_le_bytes());
        for &d in tensor.shape.iter().rev() {
            out.extend((d as u64).to_le_bytes());
        }
        out.extend(tensor.kind.id().to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += align(n_bytes, alignment);
    }
    Ok(out)
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// The value's bytes, without its type id.
fn put_value(path: &Path, out: &mut Vec<u8>, key: &str, value: &Value) -> Result<(), GgufError> {
    match value {
        Value::U8(v) => out.extend(v.to_le_bytes()),
        Value::I8(v) => out.extend(v.to_le_bytes()),
        Value::U16(v) => out.extend(v.to_le_bytes()),
        Value::I16(v) => out.extend(v.to_le_bytes()),
        Value::U32(v) => out.extend(v.to_le_bytes()),
        Value::I32(v) => out.extend(v.to_le_bytes()),
        Value::U64(v) => out.extend(v.to_le_bytes()),
        Value::I64(v) => out.extend(v.to_le_bytes()),
        Value::F32(v) => out.extend(v.to_le_bytes()),
        Value::F64(v) => out.extend(v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            // An empty array's element type is arbitrary; U8.
            let elem = items.first().map_or(value_type::U8, Value::type_id);
            if elem == value_type::ARRAY {
                return Err(invalid(
                    path,
                    format!("metadata `{key}` is an array of arrays"),
                ));
            }
            if items.iter().any(|item| item.type_id() != elem) {
                return Err(invalid(
                    path,
                    format!("metadata `{key}` mixes element types"),
                ));
            }
            out.extend(elem.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(path, out, key, item)?;
            }
        }
    }
    Ok(())
}

/// Checks a tensor can be written; returns its data's length in bytes.
fn check_write_tensor(path: &Path, tensor: &WriteTensor) -> Result<u64, GgufError> {
    let fail = |message: String| invalid(path, format!("tensor `{}` {message}", tensor.name));
    if tensor.name.len() > MAX_NAME_BYTES {
        return Err(fail(format!(
            "has a name longer than {MAX_NAME_BYTES} bytes"
        )));
    }
    if !matches!(tensor.kind, GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0) {
        return Err(fail(format!(
            "has type {}; posttrain writes {WRITE_TYPES}",
            tensor.kind
        )));
    }
    if tensor.shape.is_empty() || tensor.shape.len() as u64 > MAX_DIMS {
        return Err(fail(format!(
            "has shape {:?}; GGUF needs 1 to 4 axes",
            tensor.shape
        )));
    }
    let n = tensor
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d));
    if n != Some(tensor.values.len()) {
        return Err(fail(format!(
            "has {} values, which do not fill its shape {:?}",
            tensor.values.len(),
            tensor.shape
        )));
    }
    let row = tensor.shape.last().copied().unwrap_or(1);
    if tensor.kind == GgmlType::Q8_0 && !row.is_multiple_of(quants::QK) {
        return Err(fail(format!(
            "has rows of {row} values; Q8_0 needs a multiple of {} (write it as F16 or F32)",
            quants::QK
        )));
    }
    Ok(encoded_len(tensor))
}

fn encoded_len(tensor: &WriteTensor) -> u64 {
    let n = tensor.values.len() as u64;
    match tensor.kind {
        GgmlType::F16 => 2 * n,
        GgmlType::Q8_0 => n / quants::QK as u64 * quants::Q8_0_BYTES as u64,
        _ => 4 * n,
    }
}

fn encode_tensor(tensor: &WriteTensor) -> Vec<u8> {
    let values = tensor.values;
    match tensor.kind {
        GgmlType::F16 => values
            .iter()
            .flat_map(|&x| quants::f32_to_f16(x).to_le_bytes())
            .collect(),
        GgmlType::Q8_0 => {
            let mut out = vec![0u8; encoded_len(tensor) as usize];
            let blocks = out.chunks_exact_mut(quants::Q8_0_BYTES);
            for (block, chunk) in blocks.zip(values.chunks_exact(quants::QK)) {
                quants::quantize_q8_0(chunk, block);
            }
            out
        }
        _ => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn write_body(
    path: &Path,
    header: &[u8],
    tensors: &[WriteTensor],
    alignment: u64,
) -> Result<(), GgufError> {
    let file = File::create(path).map_err(io_error(path, "cannot create"))?;
    write_contents(file, header, tensors, alignment).map_err(io_error(path, "writing"))
}

/// The header, then each tensor's data, each padded to `alignment`.
fn write_contents(
    file: File,
    header: &[u8],
    tensors: &[WriteTensor],
    alignment: u64,
) -> std::io::Result<()> {
    let padding = |len: usize| vec![0u8; (align(len as u64, alignment) - len as u64) as usize];
    let mut out = BufWriter::new(file);
    out.write_all(header)?;
    out.write_all(&padding(header.len()))?;
    for tensor in tensors {
        let data = encode_tensor(tensor);
        out.write_all(&data)?;
        out.write_all(&padding(data.len()))?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

// ---------------------------------------------------------------- rotary permutation

/// llama.cpp's converter (`LlamaModel.permute` in convert_hf_to_gguf.py)
/// reorders the rows of q_proj / k_proj (`n_head` = the key/value head count
/// for k_proj) from Hugging Face's rotate-half layout to interleaved pairs:
/// `w.reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2)`. This is
/// that reordering, on a row-major `rows x cols` matrix.
///
/// # Panics
/// If `rows` is not a multiple of `2 * n_head` or `values` is not
/// `rows * cols` long.
pub fn permute_qk(values: &[f32], n_head: usize, rows: usize, cols: usize) -> Vec<f32> {
    let pairs = rotary_row_pairs(values, n_head, rows, cols);
    move_rows(values, cols, pairs)
}

/// The inverse of [`permute_qk`]: a GGUF q/k weight back to Hugging Face's
/// layout (transformers' `reverse_permute_weights`).
///
/// # Panics
/// As [`permute_qk`].
pub fn unpermute_qk(values: &[f32], n_head: usize, rows: usize, cols: usize) -> Vec<f32> {
    let pairs = rotary_row_pairs(values, n_head, rows, cols);
    move_rows(values, cols, pairs.map(|(hf, gguf)| (gguf, hf)))
}

/// (Hugging Face row, GGUF row) for every row: within a head, HF row
/// `half_index * half + i` is GGUF row `2 * i + half_index`.
fn rotary_row_pairs(
    values: &[f32],
    n_head: usize,
    rows: usize,
    cols: usize,
) -> impl Iterator<Item = (usize, usize)> {
    assert!(
        n_head > 0 && rows.is_multiple_of(2 * n_head),
        "{rows} rows do not split into {n_head} heads of rotary pairs"
    );
    assert_eq!(
        values.len(),
        rows * cols,
        "values do not fill {rows} x {cols}"
    );
    let per_head = rows / n_head;
    let half = per_head / 2;
    (0..rows).map(move |hf| {
        let (head, within) = (hf / per_head, hf % per_head);
        let (half_index, i) = (within / half, within % half);
        (hf, head * per_head + 2 * i + half_index)
    })
}

/// A copy of `values` with row `from` moved to row `to` for each pair.
fn move_rows(values: &[f32], cols: usize, pairs: impl Iterator<Item = (usize, usize)>) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for (from, to) in pairs {
        out[to * cols..(to + 1) * cols].copy_from_slice(&values[from * cols..(from + 1) * cols]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path in the system temp directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir();
            Scratch(dir.join(format!("posttrain-gguf-{}-{name}", std::process::id())))
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Hand-assembled GGUF bytes, independent of [`write()`].
    #[derive(Default)]
    struct Raw(Vec<u8>);

    impl Raw {
        fn header(version: u32, tensors: u64, kvs: u64) -> Raw {
            let mut raw = Raw(b"GGUF".to_vec());
            raw.u32(version).u64(tensors).u64(kvs);
            raw
        }
        fn u32(&mut self, v: u32) -> &mut Raw {
            self.0.extend(v.to_le_bytes());
            self
        }
        fn u64(&mut self, v: u64) -> &mut Raw {
            self.0.extend(v.to_le_bytes());
            self
        }
        fn str(&mut self, s: &str) -> &mut Raw {
            self.u64(s.len() as u64);
            self.0.extend(s.as_bytes());
            self
        }
        /// A tensor table entry.
        fn tensor(&mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> &mut Raw {
            self.str(name).u32(dims.len() as u32);
            for &d in dims {
                self.u64(d);
            }
            self.u32(type_id).u64(offset)
        }
        /// Zero padding to 32 and `data_len` data bytes.
        fn data(&mut self, data_len: usize) -> &mut Raw {
            let padded = align(self.0.len() as u64, 32) as usize;
            self.0.resize(padded + data_len, 0);
            self
        }
        fn save(&self, name: &str) -> Scratch {
            let path = Scratch::new(name);
            std::fs::write(&path.0, &self.0).unwrap();
            path
        }
    }

    fn open_err(path: &Scratch) -> String {
        let err = GgufFile::open(&path.0).unwrap_err().to_string();
        assert!(err.starts_with(&path.0.display().to_string()), "{err}");
        err
    }

    fn every_value_type() -> Vec<(String, Value)> {
        let strings = ["a", "", "ünïcödé", "<0x0A>"];
        vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("t.u8".into(), Value::U8(250)),
            ("t.i8".into(), Value::I8(-7)),
            ("t.u16".into(), Value::U16(65000)),
            ("t.i16".into(), Value::I16(-30000)),
            ("t.u32".into(), Value::U32(4_000_000_000)),
            ("t.i32".into(), Value::I32(-2_000_000_000)),
            ("t.u64".into(), Value::U64(u64::MAX - 1)),
            ("t.i64".into(), Value::I64(i64::MIN + 1)),
            ("t.f32".into(), Value::F32(1e-5)),
            ("t.f64".into(), Value::F64(std::f64::consts::PI)),
            ("t.bool".into(), Value::Bool(true)),
            ("t.false".into(), Value::Bool(false)),
            ("t.string".into(), Value::String("hello, GGUF".into())),
            (
                "t.strings".into(),
                Value::Array(
                    strings
                        .iter()
                        .map(|s| Value::String(s.to_string()))
                        .collect(),
                ),
            ),
            (
                "t.i32s".into(),
                Value::Array((-3..4).map(Value::I32).collect()),
            ),
            (
                "t.f32s".into(),
                Value::Array(vec![Value::F32(0.5), Value::F32(-2.0)]),
            ),
            (
                "t.bools".into(),
                Value::Array(vec![Value::Bool(false), Value::Bool(true)]),
            ),
        ]
    }

    fn ramp(n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * scale)
            .collect()
    }

    #[test]
    fn round_trip_every_value_type_and_tensor_kind() {
        let path = Scratch::new("round-trip.gguf");
        let metadata = every_value_type();
        let embed = ramp(8 * 64, 0.013);
        let norm = ramp(576, 0.002);
        let halves = ramp(3 * 5, 0.37);
        let tensors = [
            WriteTensor {
                name: "token_embd.weight".into(),
                shape: vec![8, 64],
                values: &embed,
                kind: GgmlType::Q8_0,
            },
            WriteTensor {
                name: "output_norm.weight".into(),
                shape: vec![576],
                values: &norm,
                kind: GgmlType::F32,
            },
            WriteTensor {
                name: "blk.0.odd".into(),
                shape: vec![3, 5],
                values: &halves,
                kind: GgmlType::F16,
            },
        ];
        write(&path.0, &metadata, &tensors).unwrap();
        assert!(!tmp_path(&path.0).exists());

        let gguf = GgufFile::open(&path.0).unwrap();
        assert_eq!(gguf.version, 3);
        assert_eq!(gguf.metadata, metadata);
        assert_eq!(
            gguf.get("t.u32").and_then(Value::as_u64),
            Some(4_000_000_000)
        );
        assert_eq!(
            gguf.get("t.f32").and_then(Value::as_f64),
            Some(f64::from(1e-5f32))
        );
        assert_eq!(
            gguf.get("t.string").and_then(Value::as_str),
            Some("hello, GGUF")
        );
        assert_eq!(gguf.get("t.bool").and_then(Value::as_bool), Some(true));
        assert_eq!(
            gguf.get("t.i32s").and_then(Value::as_array).map(<[_]>::len),
            Some(7)
        );
        assert_eq!(gguf.get("t.i8").and_then(Value::as_u64), None);
        assert_eq!(gguf.alignment(), 32);
        assert_eq!(gguf.data_start() % 32, 0);

        let names: Vec<_> = gguf.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["token_embd.weight", "output_norm.weight", "blk.0.odd"]
        );
        let embd = gguf.tensor("token_embd.weight").unwrap();
        assert_eq!(
            (embd.dims.clone(), embd.shape()),
            (vec![64, 8], vec![8, 64])
        );
        assert_eq!(
            (embd.kind, embd.n_elements(), embd.n_bytes()),
            (GgmlType::Q8_0, 512, Some(16 * 34))
        );
        assert_eq!(gguf.tensor("blk.0.odd").unwrap().shape(), [3, 5]);

        assert_eq!(gguf.tensor_f32("output_norm.weight").unwrap(), norm);
        let back = gguf.tensor_f32("blk.0.odd").unwrap();
        for (x, y) in halves.iter().zip(&back) {
            // Round to nearest: within half an f16 ulp (2^-11 relative).
            assert!((x - y).abs() <= x.abs() * 2f32.powi(-11), "{x} vs {y}");
        }
        let back = gguf.tensor_f32("token_embd.weight").unwrap();
        for (block, got) in embed.chunks(32).zip(back.chunks(32)) {
            let amax = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            // Half a quantization step, plus d's own f16 rounding.
            let tolerance = amax / 127.0 * (0.5 + 127.0 * 2f32.powi(-11)) + 1e-7;
            for (x, y) in block.iter().zip(got) {
                assert!((x - y).abs() <= tolerance, "{x} vs {y}");
            }
        }
        let missing = gguf.tensor_f32("nope").unwrap_err().to_string();
        assert!(missing.ends_with("no tensor named `nope`"), "{missing}");
    }

    #[test]
    fn honours_general_alignment() {
        let path = Scratch::new("aligned.gguf");
        let mut metadata = every_value_type();
        metadata.push((ALIGNMENT_KEY.into(), Value::U32(256)));
        let a = ramp(40, 0.1);
        let b = ramp(64, 0.1);
        let tensors = [
            WriteTensor {
                name: "a".into(),
                shape: vec![40],
                values: &a,
                kind: GgmlType::F32,
            },
            WriteTensor {
                name: "b".into(),
                shape: vec![2, 32],
                values: &b,
                kind: GgmlType::F16,
            },
        ];
        write(&path.0, &metadata, &tensors).unwrap();
        let gguf = GgufFile::open(&path.0).unwrap();
        assert_eq!(gguf.alignment(), 256);
        assert_eq!(gguf.data_start() % 256, 0);
        assert_eq!(gguf.tensor("b").unwrap().offset, 256);
        assert_eq!(gguf.tensor_f32("a").unwrap(), a);
    }

    #[test]
    fn write_refuses_what_it_cannot_write() {
        let path = Scratch::new("refused.gguf");
        let v = ramp(33 * 2, 0.1);
        let refuse = |tensor: WriteTensor, metadata: &[(String, Value)], wanted: &str| {
            let err = write(&path.0, metadata, &[tensor]).unwrap_err().to_string();
            assert!(err.starts_with(&path.0.display().to_string()), "{err}");
            assert!(err.contains(wanted), "{err}");
            assert!(!path.0.exists() && !tmp_path(&path.0).exists());
        };
        let t = |shape: Vec<usize>, kind| WriteTensor {
            name: "w".into(),
            shape,
            values: &v,
            kind,
        };
        refuse(
            t(vec![2, 33], GgmlType::Q8_0),
            &[],
            "Q8_0 needs a multiple of 32",
        );
        refuse(
            t(vec![2, 33], GgmlType::Q4_K),
            &[],
            "has type Q4_K; posttrain writes F32, F16 and Q8_0",
        );
        refuse(
            t(vec![2, 32], GgmlType::F32),
            &[],
            "do not fill its shape [2, 32]",
        );
        refuse(t(vec![], GgmlType::F32), &[], "needs 1 to 4 axes");
        let mixed = vec![(
            "m".to_string(),
            Value::Array(vec![Value::U8(1), Value::I8(1)]),
        )];
        refuse(
            t(vec![66], GgmlType::F32),
            &mixed,
            "`m` mixes element types",
        );
        let nested = vec![("n".to_string(), Value::Array(vec![Value::Array(vec![])]))];
        refuse(
            t(vec![66], GgmlType::F32),
            &nested,
            "`n` is an array of arrays",
        );
        let twice = vec![
            ("k".to_string(), Value::U8(1)),
            ("k".to_string(), Value::U8(2)),
        ];
        refuse(t(vec![66], GgmlType::F32), &twice, "`k` appears twice");
    }

    #[test]
    fn open_refuses_bad_magic_and_versions() {
        let mut raw = Raw::header(3, 0, 0);
        raw.0[..4].copy_from_slice(b"GGML");
        assert!(open_err(&raw.save("magic.gguf")).contains("not a GGUF file"));
        assert!(open_err(&Raw(b"GG".to_vec()).save("tiny.gguf")).contains("only 2 bytes"));
        let err = open_err(&Raw::header(1, 0, 0).save("v1.gguf"));
        assert!(err.contains("GGUF version 1 is not supported"), "{err}");
        let err = open_err(&Raw::header(3u32.swap_bytes(), 0, 0).save("be.gguf"));
        assert!(err.contains("big-endian"), "{err}");
        let v2 = Raw::header(2, 0, 0).save("v2.gguf");
        assert_eq!(GgufFile::open(&v2.0).unwrap().version, 2);
    }

    #[test]
    fn open_refuses_absurd_counts_and_lengths() {
        let err = open_err(&Raw::header(3, 0, u64::MAX).save("kvs.gguf"));
        assert!(
            err.contains("claims 18446744073709551615 metadata entries"),
            "{err}"
        );
        let err = open_err(&Raw::header(3, 1 << 40, 0).save("tensors.gguf"));
        assert!(err.contains("tensors, more than"), "{err}");
        let mut raw = Raw::header(3, 0, 1);
        raw.u64(1 << 50).data(64);
        let err = open_err(&raw.save("key.gguf"));
        assert!(
            err.contains("the key of metadata entry 0") && err.contains("cut short"),
            "{err}"
        );
        let mut raw = Raw::header(3, 0, 1);
        raw.str("big")
            .u32(value_type::STRING)
            .u64(u64::MAX)
            .data(64);
        let err = open_err(&raw.save("string.gguf"));
        assert!(err.contains("metadata `big`"), "{err}");
        let mut raw = Raw::header(3, 0, 1);
        raw.str("arr")
            .u32(value_type::ARRAY)
            .u32(value_type::U32)
            .u64(1 << 60);
        let err = open_err(&raw.save("array.gguf"));
        assert!(err.contains("elements in metadata `arr`"), "{err}");
        let mut raw = Raw::header(3, 0, 1);
        raw.str("odd").u32(77).u32(0);
        assert!(open_err(&raw.save("vtype.gguf")).contains("unknown value type 77"));
    }

    #[test]
    fn open_refuses_a_truncated_file_naming_the_tensor() {
        let mut raw = Raw::header(3, 2, 0);
        raw.tensor("ok", &[8], 0, 0)
            .tensor("blk.0.attn_q.weight", &[32, 4], 8, 32);
        raw.data(32 + 4 * 34 - 1);
        let err = open_err(&raw.save("truncated.gguf"));
        assert!(
            err.contains("tensor `blk.0.attn_q.weight` runs past the end of the file"),
            "{err}"
        );
        raw.0.push(0);
        let whole = raw.save("whole.gguf");
        let gguf = GgufFile::open(&whole.0).unwrap();
        assert_eq!(
            gguf.tensor_f32("blk.0.attn_q.weight").unwrap(),
            vec![0.0; 128]
        );
    }

    #[test]
    fn open_refuses_unknown_types_misaligned_offsets_and_partial_blocks() {
        let mut raw = Raw::header(3, 1, 0);
        raw.tensor("w", &[32], 999, 0).data(64);
        assert!(
            open_err(&raw.save("type999.gguf")).contains("tensor `w` has unknown ggml type id 999")
        );
        let mut raw = Raw::header(3, 1, 0);
        raw.tensor("w", &[4], 0, 4).data(64);
        assert!(
            open_err(&raw.save("misaligned.gguf")).contains("not a multiple of the alignment 32")
        );
        let mut raw = Raw::header(3, 1, 0);
        raw.tensor("w", &[33], 8, 0).data(128);
        assert!(open_err(&raw.save("partial.gguf")).contains("not whole Q8_0 blocks of 32"));
        let mut raw = Raw::header(3, 1, 0);
        raw.tensor("w", &[1, 1, 1, 1, 1], 0, 0).data(64);
        assert!(open_err(&raw.save("dims.gguf")).contains("has 5 dimensions"));
        let mut raw = Raw::header(3, 1, 0);
        raw.tensor("w", &[u64::MAX, 2], 0, 0).data(64);
        assert!(open_err(&raw.save("overflow.gguf")).contains("impossible shape"));
    }

    #[test]
    fn unsupported_types_are_refused_by_name() {
        let mut raw = Raw::header(3, 1, 0);
        raw.tensor("blk.0.attn_q.weight", &[256], 16, 0).data(66);
        let path = raw.save("iq2.gguf");
        let gguf = GgufFile::open(&path.0).unwrap();
        let err = gguf
            .tensor_f32("blk.0.attn_q.weight")
            .unwrap_err()
            .to_string();
        let expected = format!(
            "{}: tensor `blk.0.attn_q.weight` has type IQ2_XXS; posttrain reads F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K",
            path.0.display()
        );
        assert_eq!(err, expected);
        assert_eq!(gguf.tensor_bytes("blk.0.attn_q.weight").unwrap().len(), 66);
    }

    #[test]
    fn type_table() {
        for (kind, id, name, block, bytes) in TYPES {
            assert_eq!(GgmlType::from_id(id), kind);
            assert_eq!(
                (kind.id(), kind.name(), kind.to_string()),
                (id, name, name.to_string())
            );
            assert_eq!(
                (kind.block_size(), kind.block_bytes()),
                (Some(block), Some(bytes))
            );
        }
        assert_eq!(GgmlType::from_id(4), GgmlType::Other(4));
        assert_eq!(GgmlType::Other(999).to_string(), "unknown ggml type id 999");
        assert_eq!(GgmlType::Other(999).block_size(), None);
        let readable: Vec<_> = TYPES
            .iter()
            .filter(|t| t.0.is_readable())
            .map(|t| t.2)
            .collect();
        assert_eq!(
            readable,
            ["F32", "F16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "BF16"]
        );
    }

    #[test]
    fn unpermute_matches_hand_computed_rows() {
        // n_head = 2, 8 rows: each head's rows (a0 a1 | b0 b1) are stored
        // interleaved (a0 b0 a1 b1); the 2 x 2 swap is its own inverse.
        let gguf: Vec<f32> = (0..8).map(|i| i as f32).collect();
        assert_eq!(
            unpermute_qk(&gguf, 2, 8, 1),
            [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
        );
        // One head of 6 rows, HF (a0 a1 a2 | b0 b1 b2) -> GGUF (a0 b0 a1 b1 a2 b2).
        let hf = [10.0, 11.0, 12.0, 20.0, 21.0, 22.0];
        assert_eq!(
            permute_qk(&hf, 1, 6, 1),
            [10.0, 20.0, 11.0, 21.0, 12.0, 22.0]
        );
        let stored = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(
            unpermute_qk(&stored, 1, 6, 1),
            [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]
        );
        // Whole rows move: two columns.
        let two = [1.0, -1.0, 2.0, -2.0, 3.0, -3.0, 4.0, -4.0];
        assert_eq!(
            permute_qk(&two, 1, 4, 2),
            [1.0, -1.0, 3.0, -3.0, 2.0, -2.0, 4.0, -4.0]
        );
    }

    #[test]
    fn permute_then_unpermute_is_the_identity() {
        for (n_head, rows, cols) in [(3, 3 * 64, 5), (9, 576, 3), (3, 192, 2), (2, 8, 4)] {
            let w = ramp(rows * cols, 0.5);
            let p = permute_qk(&w, n_head, rows, cols);
            assert_ne!(p, w);
            assert_eq!(unpermute_qk(&p, n_head, rows, cols), w);
            assert_eq!(
                permute_qk(&unpermute_qk(&w, n_head, rows, cols), n_head, rows, cols),
                w
            );
        }
    }
}
