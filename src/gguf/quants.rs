//! Block (de)quantization for the ggml tensor types posttrain reads and
//! writes: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K to f32, and
//! f32 to F16 and Q8_0.
//!
//! Each `dequant_*` function turns one block (the bytes of exactly one
//! block of its type) into its values; the scalar types are blocks of one
//! element. Byte layouts and arithmetic follow ggml's reference code
//! (`ggml-quants.c`, `dequantize_row_*` / `quantize_row_q8_0_ref`) as
//! re-expressed in llama.cpp's gguf-py (`gguf/quants.py`): every product is
//! taken in the same order in f32, so results match bit for bit (the test
//! `matches_gguf_py_fixture` checks this against gguf-py's own output).
//!
//! Layouts (little-endian; `f16` is an IEEE half):
//! - Q8_0 (32 values, 34 bytes): `d: f16, qs: [i8; 32]`; `x = d * q`.
//! - Q4_0 (32, 18): `d: f16, qs: [u8; 16]`; value `j` is the low nibble of
//!   `qs[j]`, value `j + 16` the high nibble; `x = d * (q - 8)`.
//! - Q4_1 (32, 20): `d: f16, m: f16, qs: [u8; 16]` as Q4_0; `x = d * q + m`.
//! - Q4_K (256, 144): `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`:
//!   eight sub-blocks of 32 with 6-bit scales `sc` and mins `m` packed in
//!   `scales`; sub-block `2c` is the low nibbles of `qs[32c..32c + 32]`,
//!   `2c + 1` the high nibbles; `x = (d * sc) * q - dmin * m`.
//! - Q5_K (256, 176): `d, dmin, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`
//!   as Q4_K plus a fifth bit: bit `s` of `qh[l]` is the high bit of value
//!   `l` of sub-block `s`.
//! - Q6_K (256, 210): `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`:
//!   for each half `h` of 128 values, value `128h + i` (i < 64) has its low
//!   four bits in the low nibble of `ql[64h + i]` and value `128h + 64 + i`
//!   in the high nibble; value `128h + 32k + l` has its top two bits at bits
//!   `2k..2k + 2` of `qh[32h + l]`; `x = (d * scales[e / 16]) * (q - 32)`.

/// Values per block of the Q8_0, Q4_0 and Q4_1 types.
pub const QK: usize = 32;
/// Values per block of the K-quant types (Q4_K, Q5_K, Q6_K).
pub const QK_K: usize = 256;

/// Bytes of one Q8_0 block.
pub const Q8_0_BYTES: usize = 2 + QK;
/// Bytes of one Q4_0 block.
pub const Q4_0_BYTES: usize = 2 + QK / 2;
/// Bytes of one Q4_1 block.
pub const Q4_1_BYTES: usize = 2 + 2 + QK / 2;
/// Bytes of one Q4_K block.
pub const Q4_K_BYTES: usize = 2 + 2 + 12 + QK_K / 2;
/// Bytes of one Q5_K block.
pub const Q5_K_BYTES: usize = 2 + 2 + 12 + QK_K / 8 + QK_K / 2;
/// Bytes of one Q6_K block.
pub const Q6_K_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;

/// Dequantizes one block: `(block bytes, values out)`.
pub type BlockFn = fn(&[u8], &mut [f32]);

/// IEEE half (as bits) to f32, exactly (subnormals, infinities and NaN
/// payloads kept).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let magnitude = match (exp, man) {
        (0, 0) => 0,
        // Subnormal: man * 2^-24, exact in f32.
        (0, _) => (man as f32 * (1.0 / 16_777_216.0)).to_bits(),
        (0x1f, _) => 0x7f80_0000 | (man << 13),
        _ => ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(sign | magnitude)
}

/// f32 to IEEE half (as bits), rounding to nearest with ties to even, as
/// numpy's `astype(np.float16)` and the F16C instructions do; overflow
/// gives infinity, NaN stays a (quiet) NaN.
pub fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x007f_ffff;
    if exp == 0xff {
        let nan = if man != 0 {
            0x0200 | (man >> 13) as u16
        } else {
            0
        };
        return sign | 0x7c00 | nan;
    }
    let half_exp = exp - 127 + 15;
    if half_exp >= 0x1f {
        return sign | 0x7c00;
    }
    if half_exp <= 0 {
        return sign | f16_subnormal(man | 0x0080_0000, half_exp);
    }
    let truncated = ((half_exp as u32) << 10) | (man >> 13);
    // A carry out of the mantissa correctly bumps the exponent (to
    // infinity at the top).
    sign | round_half_even(truncated, man & 0x1fff, 13) as u16
}

/// The half-precision subnormal (or zero, or smallest normal after
/// rounding) nearest the f32 with 24-bit significand `significand` whose
/// half exponent would be `half_exp <= 0`.
fn f16_subnormal(significand: u32, half_exp: i32) -> u16 {
    if half_exp < -10 {
        return 0;
    }
    // The value is significand * 2^(half_exp - 25); a half subnormal unit
    // is 2^-24.
    let shift = (14 - half_exp) as u32;
    let truncated = significand >> shift;
    let rest = significand & ((1 << shift) - 1);
    round_half_even(truncated, rest, shift) as u16
}

/// `truncated` plus one when the dropped low `shift` bits `rest` are more
/// than half a unit, or exactly half and `truncated` is odd.
fn round_half_even(truncated: u32, rest: u32, shift: u32) -> u32 {
    let halfway = 1 << (shift - 1);
    if rest > halfway || (rest == halfway && truncated & 1 == 1) {
        truncated + 1
    } else {
        truncated
    }
}

/// bfloat16 (as bits) to f32, exactly.
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

/// One F32 value (4 bytes).
pub fn dequant_f32(block: &[u8], out: &mut [f32]) {
    out[0] = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
}

/// One F16 value (2 bytes).
pub fn dequant_f16(block: &[u8], out: &mut [f32]) {
    out[0] = f16_at(block, 0);
}

/// One BF16 value (2 bytes).
pub fn dequant_bf16(block: &[u8], out: &mut [f32]) {
    out[0] = bf16_to_f32(u16::from_le_bytes([block[0], block[1]]));
}

/// One Q8_0 block (34 bytes) to 32 values.
pub fn dequant_q8_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    for (x, &q) in out[..QK].iter_mut().zip(&block[2..Q8_0_BYTES]) {
        *x = f32::from(q as i8) * d;
    }
}

/// One Q4_0 block (18 bytes) to 32 values.
pub fn dequant_q4_0(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let qs = &block[2..Q4_0_BYTES];
    for (j, &q) in qs.iter().enumerate() {
        out[j] = d * f32::from((q & 0x0f) as i8 - 8);
        out[j + QK / 2] = d * f32::from((q >> 4) as i8 - 8);
    }
}

/// One Q4_1 block (20 bytes) to 32 values.
pub fn dequant_q4_1(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let m = f16_at(block, 2);
    let qs = &block[4..Q4_1_BYTES];
    for (j, &q) in qs.iter().enumerate() {
        out[j] = d * f32::from(q & 0x0f) + m;
        out[j + QK / 2] = d * f32::from(q >> 4) + m;
    }
}

/// The eight 6-bit (scale, min) pairs of a Q4_K / Q5_K block, packed in 12
/// bytes: `scales[j]` / `scales[j + 4]` hold scale / min `j < 4` in their
/// low six bits and the top two bits of scale / min `j + 4` in their top
/// two; `scales[j + 8]` holds the low four bits of scale `j + 4` (low
/// nibble) and min `j + 4` (high nibble).
pub fn k_scale_min(scales: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = scales[j] & 0x3f;
        mn[j] = scales[j + 4] & 0x3f;
        sc[j + 4] = (scales[j + 8] & 0x0f) | ((scales[j] >> 6) << 4);
        mn[j + 4] = (scales[j + 8] >> 4) | ((scales[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// One Q4_K block (144 bytes) to 256 values.
pub fn dequant_q4_k(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, 2);
    let (sc, mn) = k_scale_min(&block[4..16]);
    let qs = &block[16..Q4_K_BYTES];
    for sub in 0..8 {
        let scale = d * f32::from(sc[sub]);
        let min = dmin * f32::from(mn[sub]);
        let bytes = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
        let shift = 4 * (sub % 2);
        for (l, &b) in bytes.iter().enumerate() {
            out[32 * sub + l] = scale * f32::from((b >> shift) & 0x0f) - min;
        }
    }
}

/// One Q5_K block (176 bytes) to 256 values.
pub fn dequant_q5_k(block: &[u8], out: &mut [f32]) {
    let d = f16_at(block, 0);
    let dmin = f16_at(block, 2);
    let (sc, mn) = k_scale_min(&block[4..16]);
    let qh = &block[16..48];
    let qs = &block[48..Q5_K_BYTES];
    for sub in 0..8 {
        let scale = d * f32::from(sc[sub]);
        let min = dmin * f32::from(mn[sub]);
        let bytes = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
        let shift = 4 * (sub % 2);
        for (l, &b) in bytes.iter().enumerate() {
            let high = ((qh[l] >> sub) & 1) << 4;
            let q = ((b >> shift) & 0x0f) | high;
            out[32 * sub + l] = scale * f32::from(q) - min;
        }
    }
}

/// One Q6_K block (210 bytes) to 256 values.
pub fn dequant_q6_k(block: &[u8], out: &mut [f32]) {
    let ql = &block[..128];
    let qh = &block[128..192];
    let scales = &block[192..208];
    let d = f16_at(block, 208);
    for (e, x) in out[..QK_K].iter_mut().enumerate() {
        let half = e / 128;
        let within = e % 128;
        let low_byte = ql[64 * half + within % 64];
        let low = if within < 64 {
            low_byte & 0x0f
        } else {
            low_byte >> 4
        };
        let high = (qh[32 * half + within % 32] >> (2 * (within / 32))) & 3;
        let q = (low | (high << 4)) as i8 - 32;
        let scale = d * f32::from(scales[e / 16] as i8);
        *x = scale * f32::from(q);
    }
}

/// 32 values to one Q8_0 block (34 bytes), as ggml's
/// `quantize_row_q8_0_ref`: `d = amax / 127`, `q = round(x / d)` (taken as
/// `x * (1 / d)`, halves away from zero), `d` stored as f16.
pub fn quantize_q8_0(values: &[f32], out: &mut [u8]) {
    let values = &values[..QK];
    let amax = values.iter().fold(0.0f32, |acc, x| acc.max(x.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
    for (q, &x) in out[2..Q8_0_BYTES].iter_mut().zip(values) {
        *q = ((x * id).round() as i8) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HALF: u16 = 0x3800; // 0.5
    const ONE: u16 = 0x3c00; // 1.0
    const QUARTER: u16 = 0x3400; // 0.25

    fn block_with(prefix: &[u16], len: usize) -> Vec<u8> {
        let mut block: Vec<u8> = prefix.iter().flat_map(|h| h.to_le_bytes()).collect();
        block.resize(len, 0);
        block
    }

    #[test]
    fn f16_conversions_of_known_values() {
        let cases: [(u16, f32); 9] = [
            (0x0000, 0.0),
            (0x3c00, 1.0),
            (0xc000, -2.0),
            (0x3555, 0.333_251_95),
            (0x7bff, 65504.0),
            (0x0001, 5.960_464_5e-8), // smallest subnormal, 2^-24
            (0x03ff, 6.097_555e-5),   // largest subnormal
            (0x0400, 6.103_515_6e-5), // smallest normal, 2^-14
            (0x7c00, f32::INFINITY),
        ];
        for (bits, value) in cases {
            assert_eq!(f16_to_f32(bits), value, "{bits:#06x}");
            assert_eq!(f32_to_f16(value), bits, "{value}");
        }
        assert_eq!(f16_to_f32(0x8000).to_bits(), 0x8000_0000);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert!(f16_to_f32(f32_to_f16(f32::NAN)).is_nan());
    }

    #[test]
    fn f32_to_f16_rounds_half_to_even() {
        // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to 1 (even).
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00);
        // 1 + 3 * 2^-11 is halfway between 1 + 2^-10 (odd) and 1 + 2^-9.
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        // Just above halfway rounds up.
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11) + 2f32.powi(-20)), 0x3c01);
        // 65519 rounds down to 65504, 65520 (halfway to 65536) up to inf.
        assert_eq!(f32_to_f16(65519.0), 0x7bff);
        assert_eq!(f32_to_f16(65520.0), 0x7c00);
        assert_eq!(f32_to_f16(1e10), 0x7c00);
        assert_eq!(f32_to_f16(-1e10), 0xfc00);
        // 2^-25 is halfway between 0 and the smallest subnormal: ties to 0;
        // 1.5 * 2^-24 ties to 2 * 2^-24.
        assert_eq!(f32_to_f16(2f32.powi(-25)), 0x0000);
        assert_eq!(f32_to_f16(2f32.powi(-25) * 1.5), 0x0001);
        assert_eq!(f32_to_f16(1.5 * 2f32.powi(-24)), 0x0002);
        assert_eq!(f32_to_f16(1e-30), 0x0000);
        // The largest subnormal plus half a unit rounds into the normals.
        assert_eq!(f32_to_f16(1023.5 * 2f32.powi(-24)), 0x0400);
    }

    #[test]
    fn bf16_is_the_top_half_of_an_f32() {
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
        assert_eq!(bf16_to_f32(0xc0a0), -5.0);
        assert_eq!(bf16_to_f32(0x3e20), 0.156_25);
        let mut out = [0.0];
        dequant_bf16(&[0x80, 0x3f], &mut out);
        assert_eq!(out, [1.0]);
        dequant_f16(&[0x00, 0xc0], &mut out);
        assert_eq!(out, [-2.0]);
        dequant_f32(&1.25f32.to_le_bytes(), &mut out);
        assert_eq!(out, [1.25]);
    }

    #[test]
    fn q8_0_block_by_hand() {
        let mut block = block_with(&[HALF], Q8_0_BYTES);
        for j in 0..QK {
            block[2 + j] = (j as i8 * 4 - 64) as u8;
        }
        let mut out = [0.0; QK];
        dequant_q8_0(&block, &mut out);
        for (j, x) in out.iter().enumerate() {
            assert_eq!(*x, (j as f32 * 4.0 - 64.0) * 0.5, "value {j}");
        }
    }

    #[test]
    fn q4_0_block_by_hand() {
        let mut block = block_with(&[HALF], Q4_0_BYTES);
        for j in 0..16 {
            block[2 + j] = (j as u8) | ((15 - j as u8) << 4);
        }
        let mut out = [0.0; QK];
        dequant_q4_0(&block, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], (j as f32 - 8.0) * 0.5, "low {j}");
            assert_eq!(out[j + 16], (7.0 - j as f32) * 0.5, "high {j}");
        }
    }

    #[test]
    fn q4_1_block_by_hand() {
        // d = 0.25, m = -1.0 (0xbc00)
        let mut block = block_with(&[QUARTER, 0xbc00], Q4_1_BYTES);
        for j in 0..16 {
            block[4 + j] = ((j as u8 * 3) % 16) | ((j as u8) << 4);
        }
        let mut out = [0.0; QK];
        dequant_q4_1(&block, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], ((j * 3) % 16) as f32 * 0.25 - 1.0, "low {j}");
            assert_eq!(out[j + 16], j as f32 * 0.25 - 1.0, "high {j}");
        }
    }

    /// Packs eight 6-bit scales and mins the way ggml's `quantize_row_q4_K`
    /// stores them.
    fn pack_k_scales(sc: [u8; 8], mn: [u8; 8]) -> [u8; 12] {
        let mut packed = [0u8; 12];
        for j in 0..4 {
            packed[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            packed[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
            packed[j + 8] = (sc[j + 4] & 0x0f) | ((mn[j + 4] & 0x0f) << 4);
        }
        packed
    }

    const SCALES: [u8; 8] = [1, 2, 3, 63, 17, 33, 48, 5];
    const MINS: [u8; 8] = [0, 1, 2, 3, 40, 50, 63, 7];

    /// The 4-bit quant of value `l` of sub-block `sub` in the K tests.
    fn nibble(sub: usize, l: usize) -> u8 {
        ((l * 5 + sub * 3) % 16) as u8
    }

    fn k_quant_nibbles() -> Vec<u8> {
        let mut qs = vec![0u8; 128];
        for chunk in 0..4 {
            for l in 0..32 {
                qs[32 * chunk + l] = nibble(2 * chunk, l) | (nibble(2 * chunk + 1, l) << 4);
            }
        }
        qs
    }

    #[test]
    fn k_scales_unpack() {
        assert_eq!(k_scale_min(&pack_k_scales(SCALES, MINS)), (SCALES, MINS));
    }

    #[test]
    fn q4_k_block_by_hand() {
        let mut block = block_with(&[ONE, HALF], 4);
        block.extend(pack_k_scales(SCALES, MINS));
        block.extend(k_quant_nibbles());
        assert_eq!(block.len(), Q4_K_BYTES);
        let mut out = [0.0; QK_K];
        dequant_q4_k(&block, &mut out);
        for sub in 0..8 {
            for l in 0..32 {
                let expected =
                    f32::from(SCALES[sub]) * f32::from(nibble(sub, l)) - 0.5 * f32::from(MINS[sub]);
                assert_eq!(out[32 * sub + l], expected, "sub-block {sub} value {l}");
            }
        }
    }

    #[test]
    fn q5_k_block_by_hand() {
        let high_bit = |sub: usize, l: usize| u8::from((l + sub).is_multiple_of(3));
        let mut block = block_with(&[HALF, QUARTER], 4);
        block.extend(pack_k_scales(SCALES, MINS));
        for l in 0..32 {
            block.push((0..8).map(|sub| high_bit(sub, l) << sub).sum());
        }
        block.extend(k_quant_nibbles());
        assert_eq!(block.len(), Q5_K_BYTES);
        let mut out = [0.0; QK_K];
        dequant_q5_k(&block, &mut out);
        for sub in 0..8 {
            for l in 0..32 {
                let q = f32::from(nibble(sub, l) + 16 * high_bit(sub, l));
                let expected = 0.5 * f32::from(SCALES[sub]) * q - 0.25 * f32::from(MINS[sub]);
                assert_eq!(out[32 * sub + l], expected, "sub-block {sub} value {l}");
            }
        }
    }

    #[test]
    fn q6_k_block_by_hand() {
        let q = |e: usize| ((e * 7 + e / 64) % 64) as u8;
        let scale = |s: usize| (s as i8 - 8) * 3;
        let mut ql = vec![0u8; 128];
        let mut qh = vec![0u8; 64];
        for half in 0..2 {
            for i in 0..64 {
                let first = q(128 * half + i);
                let second = q(128 * half + 64 + i);
                ql[64 * half + i] = (first & 0x0f) | ((second & 0x0f) << 4);
            }
            for l in 0..32 {
                for k in 0..4 {
                    qh[32 * half + l] |= (q(128 * half + 32 * k + l) >> 4) << (2 * k);
                }
            }
        }
        let mut block = ql;
        block.extend(qh);
        block.extend((0..16).map(|s| scale(s) as u8));
        block.extend(QUARTER.to_le_bytes());
        assert_eq!(block.len(), Q6_K_BYTES);
        let mut out = [0.0; QK_K];
        dequant_q6_k(&block, &mut out);
        for (e, x) in out.iter().enumerate() {
            let expected = 0.25 * f32::from(scale(e / 16)) * (f32::from(q(e)) - 32.0);
            assert_eq!(*x, expected, "value {e}");
        }
    }

    #[test]
    fn q8_0_quantize_by_hand() {
        // amax = 63.5 -> d = 0.5 (exact in f16), so q = 2x exactly.
        let mut values: Vec<f32> = (0..QK).map(|j| (j as f32 - 16.0) * 1.5).collect();
        values[0] = 63.5;
        let mut block = [0u8; Q8_0_BYTES];
        quantize_q8_0(&values, &mut block);
        assert_eq!(u16::from_le_bytes([block[0], block[1]]), HALF);
        assert_eq!(block[2] as i8, 127);
        for j in 1..QK {
            assert_eq!(
                i32::from(block[2 + j] as i8),
                3 * (j as i32 - 16),
                "value {j}"
            );
        }
        // Halves round away from zero, as C's roundf.
        let mut halves = [0.0f32; QK];
        halves[0] = 127.0; // d = 1
        halves[1] = 2.5;
        halves[2] = -2.5;
        halves[3] = 0.5;
        quantize_q8_0(&halves, &mut block);
        assert_eq!(&block[2..6], &[127, 3, (-3i8) as u8, 1]);
        // All zeros: d = 0 and every quant 0.
        quantize_q8_0(&[0.0; QK], &mut block);
        assert!(block.iter().all(|&b| b == 0));
    }

    /// Blocks and their dequantized values made by gguf-py
    /// (`tests/fixtures/make_gguf_blocks.py`); every value must match bit
    /// for bit, as must Q8_0 and F16 quantization.
    #[test]
    fn matches_gguf_py_fixture() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/gguf_blocks.json"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cases = fixture["dequantize"].as_object().unwrap();
        for name in [
            "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K",
        ] {
            let case = &cases[name];
            let bytes = hex(case["bytes"].as_str().unwrap());
            let expected = u32s(&case["values_bits"]);
            let (dequant, block_values, block_bytes) = block_fn(name);
            assert_eq!(
                bytes.len() / block_bytes * block_values,
                expected.len(),
                "{name}"
            );
            let mut out = vec![0.0; expected.len()];
            for (block, values) in bytes
                .chunks_exact(block_bytes)
                .zip(out.chunks_exact_mut(block_values))
            {
                dequant(block, values);
            }
            for (i, (x, bits)) in out.iter().zip(&expected).enumerate() {
                assert_eq!(
                    x.to_bits(),
                    *bits,
                    "{name} value {i}: {x} vs {}",
                    f32::from_bits(*bits)
                );
            }
        }

        let q8 = &fixture["quantize_q8_0"];
        let values: Vec<f32> = u32s(&q8["values_bits"])
            .into_iter()
            .map(f32::from_bits)
            .collect();
        let expected = hex(q8["bytes"].as_str().unwrap());
        let mut got = vec![0u8; values.len() / QK * Q8_0_BYTES];
        for (v, b) in values
            .chunks_exact(QK)
            .zip(got.chunks_exact_mut(Q8_0_BYTES))
        {
            quantize_q8_0(v, b);
        }
        assert_eq!(got, expected, "Q8_0 quantization");

        let f16 = &fixture["f32_to_f16"];
        let values = u32s(&f16["values_bits"]);
        let halves = f16["halves"].as_array().unwrap();
        for (bits, half) in values.iter().zip(halves) {
            let x = f32::from_bits(*bits);
            assert_eq!(u64::from(f32_to_f16(x)), half.as_u64().unwrap(), "{x:e}");
        }
    }

    fn block_fn(name: &str) -> (BlockFn, usize, usize) {
        match name {
            "F32" => (dequant_f32, 1, 4),
            "F16" => (dequant_f16, 1, 2),
            "BF16" => (dequant_bf16, 1, 2),
            "Q8_0" => (dequant_q8_0, QK, Q8_0_BYTES),
            "Q4_0" => (dequant_q4_0, QK, Q4_0_BYTES),
            "Q4_1" => (dequant_q4_1, QK, Q4_1_BYTES),
            "Q4_K" => (dequant_q4_k, QK_K, Q4_K_BYTES),
            "Q5_K" => (dequant_q5_k, QK_K, Q5_K_BYTES),
            "Q6_K" => (dequant_q6_k, QK_K, Q6_K_BYTES),
            _ => panic!("no block function for {name}"),
        }
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    fn u32s(value: &serde_json::Value) -> Vec<u32> {
        let items = value.as_array().unwrap();
        items.iter().map(|v| v.as_u64().unwrap() as u32).collect()
    }
}
