//! JPEG structure read from the markers, and decoding at a reduced scale in the DCT domain.
//!
//! A JPEG stores 8x8 blocks of DCT coefficients. Decoding at 1/2, 1/4 or 1/8 runs a 4x4, 2x2
//! or 1x1 inverse DCT per block instead of the 8x8 one, and colour conversion and everything
//! after it touch 4, 16 or 64 times fewer pixels; entropy decoding stays the same. For a 12 MP
//! photo bound for a 248-pixel resize that is most of the work. libjpeg-turbo (as built by
//! `mozjpeg-sys`, static, no assembler needed) does the scaled decode; the choice against the
//! other decoders is recorded in docs/performance.md.

use std::ffi::{c_int, c_long, c_ulong};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use image::RgbImage;
use mozjpeg_sys as ffi;

use super::ImageError;

/// The scales libjpeg decodes at, as divisors of each side.
pub const SCALE_DIVISORS: [u32; 4] = [8, 4, 2, 1];

/// Most scans a JPEG may have. A progressive decoder passes over every block once per scan,
/// so thousands of tiny scans make a small file cost minutes; real encoders write at most a
/// few dozen. zune-jpeg, the full-size decoder, has the same limit.
const MAX_SCANS: usize = 100;

/// What the markers say about decoding a JPEG, read without decoding anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Whether libjpeg can decode it at a reduced scale: 8-bit Huffman-coded, baseline,
    /// extended or progressive, with 1, 3 or 4 components.
    pub scalable: bool,
    /// Progressive, or baseline with more than one scan: the decoder holds every coefficient
    /// of the image until the last scan.
    pub multi_scan: bool,
    /// Bytes of that whole-image coefficient buffer (2 bytes per coefficient, components
    /// padded to whole MCUs, as libjpeg allocates it).
    pub coefficient_bytes: u64,
}

impl Layout {
    /// Upper bound of libjpeg's own memory for decoding at any scale: the coefficient buffer
    /// of a multi-scan file, plus a few MCU rows of samples at full width for the inverse
    /// DCT, upsampling and colour conversion, plus tables. libjpeg refuses to allocate the
    /// coefficient buffer past the limit it is given; the rest is bounded by the width.
    pub fn working_bytes(&self, width: u32) -> u64 {
        const ROWS: u64 = 64;
        const TABLES: u64 = 1 << 20;
        let buffered = if self.multi_scan { self.coefficient_bytes } else { 0 };
        buffered + ROWS * 4 * width as u64 + TABLES
    }
}

/// Walks the markers: checks that the data reaches its end-of-image marker and reads the
/// frame header's layout.
///
/// A JPEG whose data ends before its end-of-image marker is truncated. Decoders fill what is
/// missing with grey and carry on, as browsers do; PIL refuses such files, and so do we.
/// Segments are walked by their lengths; inside a scan, a marker is 0xFF followed by a byte
/// other than 0x00 (a stuffed 0xFF) or a restart marker's. Stray bytes between segments are
/// skipped, as libjpeg does.
pub fn read_layout(bytes: &[u8]) -> Result<Layout, ImageError> {
    let truncated = || {
        ImageError::Corrupt("JPEG data ends before its end-of-image marker (truncated file)".into())
    };
    let mut frame: Option<(Layout, u8)> = None; // and the frame's component count
    let mut scans = 0;
    let mut at = 2; // after SOI
    loop {
        at += memchr::memchr(0xFF, bytes.get(at..).unwrap_or_default()).ok_or_else(truncated)?;
        while bytes.get(at + 1) == Some(&0xFF) {
            at += 1; // fill bytes before a marker
        }
        let marker = *bytes.get(at + 1).ok_or_else(truncated)?;
        at += 2;
        match marker {
            0xD9 => {
                let unscalable =
                    Layout { scalable: false, multi_scan: false, coefficient_bytes: 0 };
                return Ok(frame.map_or(unscalable, |(layout, _)| layout));
            }
            0x00 | 0x01 | 0xD0..=0xD7 => continue, // no length field
            _ => {}
        }
        let len = bytes
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
            .ok_or_else(truncated)?;
        let segment = bytes.get(at + 2..at + len.max(2)).ok_or_else(truncated)?;
        at += len;
        match marker {
            // SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                if frame.is_some() {
                    return Err(ImageError::Corrupt("JPEG has more than one frame header".into()));
                }
                frame = Some(frame_layout(marker, segment));
            }
            0xDA => {
                scans += 1;
                if scans > MAX_SCANS {
                    return Err(ImageError::Corrupt(format!(
                        "JPEG has more than {MAX_SCANS} scans"
                    )));
                }
                // As libjpeg decides: a first scan without every component of the frame
                // means the whole image's coefficients are buffered.
                if let (1, Some((layout, components))) = (scans, frame.as_mut()) {
                    layout.multi_scan |= segment.first().is_some_and(|&n| n < *components);
                }
                // Entropy-coded data: stop at the next real marker, which the outer loop reads.
                loop {
                    at += memchr::memchr(0xFF, &bytes[at..]).ok_or_else(truncated)?;
                    match bytes.get(at + 1) {
                        None => return Err(truncated()),
                        Some(0x00 | 0xD0..=0xD7) => at += 2,
                        Some(_) => break,
                    }
                }
            }
            _ => {}
        }
    }
}

/// The layout a start-of-frame segment (after its length field) declares, and its component
/// count.
fn frame_layout(marker: u8, segment: &[u8]) -> (Layout, u8) {
    let unscalable = (Layout { scalable: false, multi_scan: false, coefficient_bytes: 0 }, 0);
    // precision, height (2), width (2), component count, then 3 bytes per component.
    let [precision, h0, h1, w0, w1, count, ref components @ ..] = *segment else {
        return unscalable;
    };
    let (height, width) =
        (u16::from_be_bytes([h0, h1]) as u64, u16::from_be_bytes([w0, w1]) as u64);
    let huffman = matches!(marker, 0xC0..=0xC2);
    if !huffman || precision != 8 || !matches!(count, 1 | 3 | 4) {
        return unscalable;
    }
    let Some(components) = components.get(..3 * count as usize) else { return unscalable };
    let sampling: Vec<(u64, u64)> =
        components.chunks(3).map(|c| ((c[1] >> 4) as u64, (c[1] & 15) as u64)).collect();
    if sampling.iter().any(|&(h, v)| !(1..=4).contains(&h) || !(1..=4).contains(&v)) {
        return unscalable;
    }
    let max_h = sampling.iter().map(|s| s.0).max().unwrap_or(1);
    let max_v = sampling.iter().map(|s| s.1).max().unwrap_or(1);
    // libjpeg's jdinput.c and jdcoefct.c: blocks per component, rounded up to whole MCUs.
    let coefficient_bytes = sampling
        .iter()
        .map(|&(h, v)| {
            let blocks_w = (width * h).div_ceil(max_h * 8).next_multiple_of(h);
            let blocks_h = (height * v).div_ceil(max_v * 8).next_multiple_of(v);
            blocks_w * blocks_h * 64 * 2
        })
        .sum();
    (Layout { scalable: true, multi_scan: marker == 0xC2, coefficient_bytes }, count)
}

/// A libjpeg error, carried out of the C code by unwinding.
struct Failure {
    message: String,
    /// libjpeg needed memory past `max_memory_to_use` (it would have used a temporary file,
    /// which this build does not have) or malloc failed.
    over_memory_limit: bool,
}

/// Decodes a JPEG at 1/`divisor` of its size (1, 2, 4 or 8) into RGB. libjpeg may hold at
/// most `memory_limit` bytes in its large buffers; a file that needs more is refused.
/// CMYK and YCCK files are converted like the full-size decoder does.
pub fn decode_scaled(
    bytes: &[u8],
    divisor: u32,
    memory_limit: u64,
) -> Result<RgbImage, ImageError> {
    debug_assert!(SCALE_DIVISORS.contains(&divisor));
    let mut err: Box<ffi::jpeg_error_mgr> = Box::new(
        // SAFETY: jpeg_error_mgr is plain data (integers, pointers, optional function
        // pointers): all-zero is a valid value, and jpeg_std_error fills it in below.
        unsafe { std::mem::zeroed() },
    );
    let mut cinfo: Box<ffi::jpeg_decompress_struct> = Box::new(
        // SAFETY: as above; jpeg_create_decompress initialises it.
        unsafe { std::mem::zeroed() },
    );
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `err` and `cinfo` are boxed and outlive every libjpeg call made with them
        // (jpeg_destroy_decompress below is the last). libjpeg reports errors through
        // `error_exit`, which unwinds (mozjpeg-sys compiles libjpeg with -fexceptions and
        // declares these functions "C-unwind"); the unwind is caught here, and libjpeg's
        // documented recovery after an error exit is jpeg_destroy. `bytes` outlives the
        // decompressor that reads it, and every row pointer handed to jpeg_read_scanlines
        // points at a whole row inside `pixels`.
        unsafe {
            ffi::jpeg_std_error(&mut err);
            err.error_exit = Some(error_exit);
            err.emit_message = Some(ignore_message);
            cinfo.common.err = &mut *err;
            ffi::jpeg_create_decompress(&mut *cinfo);
            ffi::jpeg_mem_src(&mut cinfo, bytes.as_ptr(), bytes.len() as c_ulong);
            if ffi::jpeg_read_header(&mut cinfo, 1) != 1 {
                return Err("no image in the JPEG data".to_string());
            }
            let cmyk = matches!(
                cinfo.jpeg_color_space,
                ffi::J_COLOR_SPACE::JCS_CMYK | ffi::J_COLOR_SPACE::JCS_YCCK
            );
            cinfo.out_color_space =
                if cmyk { ffi::J_COLOR_SPACE::JCS_CMYK } else { ffi::J_COLOR_SPACE::JCS_RGB };
            cinfo.scale_num = 1;
            cinfo.scale_denom = divisor;
            (*cinfo.common.mem).max_memory_to_use = memory_limit.min(c_long::MAX as u64) as c_long;
            ffi::jpeg_start_decompress(&mut cinfo);
            let (width, height) = (cinfo.output_width as usize, cinfo.output_height as usize);
            let row = width * cinfo.output_components as usize;
            let mut pixels = vec![0u8; row * height];
            let mut rows: Vec<*mut u8> =
                pixels.chunks_exact_mut(row).map(|r| r.as_mut_ptr()).collect();
            while (cinfo.output_scanline as usize) < height {
                let done = cinfo.output_scanline as usize;
                let read = ffi::jpeg_read_scanlines(
                    &mut cinfo,
                    rows[done..].as_mut_ptr(),
                    (height - done) as u32,
                );
                if read == 0 {
                    return Err("the decoder stopped before the last row".to_string());
                }
            }
            ffi::jpeg_finish_decompress(&mut cinfo);
            Ok((width as u32, height as u32, cmyk, pixels))
        }
    }));
    // SAFETY: `cinfo` was zeroed, then possibly created; jpeg_destroy_decompress frees what
    // was allocated and does nothing for a struct whose memory manager was never set up.
    unsafe { ffi::jpeg_destroy_decompress(&mut cinfo) };
    let (width, height, cmyk, pixels) = match outcome {
        Ok(Ok(decoded)) => decoded,
        Ok(Err(message)) => return Err(ImageError::Corrupt(message)),
        Err(payload) => match payload.downcast::<Failure>() {
            Ok(failure) if failure.over_memory_limit => {
                return Err(ImageError::OverLimits(format!(
                    "decoding this JPEG needs more than {memory_limit} bytes"
                )))
            }
            Ok(failure) => return Err(ImageError::Corrupt(failure.message)),
            Err(other) => resume_unwind(other),
        },
    };
    let rgb = if cmyk { cmyk_to_rgb(&pixels) } else { pixels };
    Ok(RgbImage::from_raw(width, height, rgb).expect("the decoder wrote width*height pixels"))
}

/// Adobe's CMYK JPEGs store inverted ink values, as libjpeg returns them; the full-size
/// decoder (zune-jpeg, through `image`) multiplies each inverted ink by the inverted black.
fn cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let k = px[3] as u32;
        for &c in &px[..3] {
            rgb.push(((c as u32 * k + 127) / 255) as u8);
        }
    }
    rgb
}

extern "C-unwind" fn error_exit(cinfo: &mut ffi::jpeg_common_struct) {
    /// libjpeg's JMSG_LENGTH_MAX.
    const MESSAGE_LENGTH: usize = 200;
    type FormatMessage =
        unsafe extern "C-unwind" fn(&mut ffi::jpeg_common_struct, *mut std::ffi::c_char);
    let mut buffer = [0u8; MESSAGE_LENGTH];
    // SAFETY: libjpeg calls this with its own struct, whose `err` is the manager set up in
    // decode_scaled. format_message writes at most JMSG_LENGTH_MAX bytes, NUL included, into
    // its buffer: mozjpeg-sys declares that parameter `&[u8; 80]`, which would promise a
    // read-only 80 bytes, so the function is called through its C signature (same ABI: one
    // struct pointer and one char pointer) with a writable buffer of the C size.
    let (code, message) = unsafe {
        let err = &*cinfo.err;
        if let Some(format) = err.format_message {
            let format: FormatMessage = std::mem::transmute(format);
            format(cinfo, buffer.as_mut_ptr().cast());
        }
        let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
        (err.msg_code, String::from_utf8_lossy(&buffer[..end]).into_owned())
    };
    let over_memory_limit = matches!(code, ffi::JERR_NO_BACKING_STORE | ffi::JERR_OUT_OF_MEMORY);
    // resume_unwind, unlike panic!, does not run the panic hook: this is an error, not a bug.
    resume_unwind(Box::new(Failure { message, over_memory_limit }));
}

/// Warnings (corrupt data that libjpeg recovers from) are ignored, as PIL does; truncation,
/// the one that matters, is refused by [`read_layout`] before decoding.
extern "C-unwind" fn ignore_message(_cinfo: &mut ffi::jpeg_common_struct, _level: c_int) {}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use image::ImageFormat;

    use super::*;

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x * 5) as u8, (y * 6) as u8, ((x + y) * 3) as u8])
        });
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Jpeg).unwrap();
        out
    }

    #[test]
    fn a_complete_jpeg_passes_and_every_cut_fails() {
        let data = jpeg(48, 40);
        read_layout(&data).unwrap();
        for cut in [data.len() - 1, data.len() - 2, data.len() * 2 / 3, data.len() / 3, 40, 3] {
            assert!(read_layout(&data[..cut]).is_err(), "cut at {cut} of {}", data.len());
        }
        // Bytes after the end marker (camera trailers) are fine.
        let mut trailer = data.clone();
        trailer.extend_from_slice(b"trailing data");
        read_layout(&trailer).unwrap();
    }

    /// SOI, a baseline frame of one 8x8 component, `scans` scans of one byte each, EOI.
    fn with_scans(scans: usize, extra_frame: bool) -> Vec<u8> {
        let mut out = vec![0xFF, 0xD8];
        let frame = [0xFF, 0xC0, 0, 11, 8, 0, 8, 0, 8, 1, 1, 0x11, 0];
        out.extend_from_slice(&frame);
        if extra_frame {
            out.extend_from_slice(&frame);
        }
        for _ in 0..scans {
            out.extend_from_slice(&[0xFF, 0xDA, 0, 8, 1, 1, 0, 0, 63, 0, 0x55]);
        }
        out.extend_from_slice(&[0xFF, 0xD9]);
        out
    }

    #[test]
    fn a_second_frame_header_or_too_many_scans_are_refused() {
        assert!(read_layout(&with_scans(MAX_SCANS, false)).is_ok());
        assert!(read_layout(&with_scans(MAX_SCANS + 1, false)).is_err());
        assert!(read_layout(&with_scans(1, true)).is_err());
    }

    #[test]
    fn the_layout_gives_libjpegs_coefficient_buffer() {
        // image's encoder writes baseline 4:4:4 in one scan: 3 components of 13x10 blocks.
        let layout = read_layout(&jpeg(100, 75)).unwrap();
        assert_eq!(
            layout,
            Layout { scalable: true, multi_scan: false, coefficient_bytes: 3 * 13 * 10 * 128 }
        );
    }

    #[test]
    fn output_is_the_ceiling_of_each_side_over_the_divisor() {
        let data = jpeg(100, 75);
        for (divisor, size) in [(1, (100, 75)), (2, (50, 38)), (4, (25, 19)), (8, (13, 10))] {
            let image = decode_scaled(&data, divisor, 1 << 30).unwrap();
            assert_eq!(image.dimensions(), size, "1/{divisor}");
        }
    }

    #[test]
    fn libjpeg_errors_are_corrupt_image_errors() {
        // (Truncated scans are refused by read_layout: libjpeg would fill them with grey.)
        let no_frame = [0xFF, 0xD8, 0xFF, 0xD9];
        let bad_frame = [0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x03, 0x00, 0xFF, 0xD9];
        for bytes in [&no_frame[..], &bad_frame[..], &[][..]] {
            let result = decode_scaled(bytes, 8, 1 << 30);
            assert!(matches!(result, Err(ImageError::Corrupt(_))), "{bytes:?}: {result:?}");
        }
    }

    #[test]
    fn a_coefficient_buffer_over_the_limit_is_refused() {
        let path =
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/formats/progressive_444.jpg");
        let progressive = std::fs::read(path).unwrap();
        let layout = read_layout(&progressive).unwrap();
        assert!(layout.scalable && layout.multi_scan);
        let width = image::load_from_memory(&progressive).unwrap().width();
        assert!(decode_scaled(&progressive, 8, layout.working_bytes(width)).is_ok());
        let result = decode_scaled(&progressive, 8, layout.coefficient_bytes / 2);
        assert!(matches!(result, Err(ImageError::OverLimits(_))), "{result:?}");
    }
}
