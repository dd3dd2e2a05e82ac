//! Reading a pairing token from a picture of a node's console (`kairosctl register
//! --qr-code-image`): a PNG (a screenshot, or a photo saved as PNG) decoded to grey levels
//! and searched for QR codes. The picture is untrusted: its size is bounded before it is
//! decoded.

use std::path::Path;

use anyhow::{Context, Result, bail};

/// The largest decoded picture (8 K × 8 K grey, or less in colour).
const MAX_PIXELS_BYTES: usize = 256 << 20;

/// The grey levels of a PNG: (width, height, one byte per pixel).
pub fn grey_png(bytes: &[u8]) -> Result<(usize, usize, Vec<u8>)> {
    let mut dec = png::Decoder::new_with_limits(
        std::io::Cursor::new(bytes),
        png::Limits {
            bytes: MAX_PIXELS_BYTES,
        },
    );
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = dec.read_info().context("not a PNG picture")?;
    let size = reader
        .output_buffer_size()
        .context("the picture is too large")?;
    if size > MAX_PIXELS_BYTES {
        bail!("the picture is too large ({size} bytes decoded)");
    }
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .context("decoding the picture")?;
    let (w, h) = (info.width as usize, info.height as usize);
    let ch = info.color_type.samples();
    let grey = buf[..info.buffer_size()]
        .chunks(info.line_size)
        .take(h)
        .flat_map(|line| {
            line.chunks(ch).take(w).map(move |px| match px.len() {
                1 | 2 => px[0],
                // Luma of RGB(A) (alpha ignored: screenshots are opaque).
                _ => {
                    ((u32::from(px[0]) * 299 + u32::from(px[1]) * 587 + u32::from(px[2]) * 114)
                        / 1000) as u8
                }
            })
        })
        .collect();
    Ok((w, h, grey))
}

/// The text of the first QR code found in the grey picture.
pub fn decode_grey(w: usize, h: usize, grey: &[u8]) -> Result<String> {
    let mut img = rqrr::PreparedImage::prepare_from_greyscale(w, h, |x, y| grey[y * w + x]);
    let grids = img.detect_grids();
    if grids.is_empty() {
        bail!("no QR code found in the picture (crop it to the code, with some margin)");
    }
    let mut last = None;
    for g in grids {
        match g.decode() {
            Ok((_, text)) => return Ok(text),
            Err(e) => last = Some(e),
        }
    }
    bail!(
        "a QR code was found but could not be read ({}); take a sharper picture",
        last.map(|e| e.to_string()).unwrap_or_default()
    )
}

/// The text of the QR code in the PNG at `path`.
pub fn decode_png_file(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if meta.len() > 64 << 20 {
        bail!("{}: larger than 64 MiB; crop the picture", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (w, h, grey) = grey_png(&bytes).with_context(|| format!("{}", path.display()))?;
    decode_grey(w, h, &grey).with_context(|| format!("{}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PNG of `text`'s QR code, `scale` pixels a module, dark on light, in RGB or grey.
    fn png_of(text: &str, scale: usize, rgb: bool) -> Vec<u8> {
        let code = qrcode::QrCode::new(text.as_bytes()).unwrap();
        let w = code.width();
        let colors = code.to_colors();
        let size = (w + 8) * scale;
        let mut out = Vec::new();
        {
            let mut e = png::Encoder::new(&mut out, size as u32, size as u32);
            e.set_color(if rgb {
                png::ColorType::Rgb
            } else {
                png::ColorType::Grayscale
            });
            e.set_depth(png::BitDepth::Eight);
            let mut wr = e.write_header().unwrap();
            let mut data = Vec::new();
            for y in 0..size {
                for x in 0..size {
                    let (mx, my) = (x / scale, y / scale);
                    let dark = (4..w + 4).contains(&mx)
                        && (4..w + 4).contains(&my)
                        && colors[(my - 4) * w + (mx - 4)] == qrcode::Color::Dark;
                    let v = if dark { 20 } else { 235 };
                    data.extend(std::iter::repeat_n(v, if rgb { 3 } else { 1 }));
                }
            }
            wr.write_image_data(&data).unwrap();
        }
        out
    }

    #[test]
    fn a_token_comes_back_from_a_picture() {
        let token = kairos_mesh::Token::generate(3600).encode();
        for rgb in [false, true] {
            let bytes = png_of(&token, 4, rgb);
            let (w, h, g) = grey_png(&bytes).unwrap();
            assert_eq!(decode_grey(w, h, &g).unwrap(), token);
        }
    }

    #[test]
    fn not_a_picture_or_no_code() {
        assert!(grey_png(b"GIF89a").is_err());
        let e = decode_grey(64, 64, &[255u8; 64 * 64]).unwrap_err();
        assert!(e.to_string().contains("no QR code"), "{e}");
    }
}
