//! Training curves as one PNG: three panels side by side (loss, accuracy, learning rate per
//! epoch); training in red, validation in blue, the learning rate in black. Each panel prints
//! its axis range (top and bottom values) in a small built-in digit font, so no font files or
//! plotting stack are needed.

use anyhow::Result;
use image::{Rgb, RgbImage};
use std::path::Path;
use xception::train::EpochMetrics;

const W: u32 = 360;
const H: u32 = 260;
const MARGIN: u32 = 44;
const RED: Rgb<u8> = Rgb([214, 39, 40]);
const BLUE: Rgb<u8> = Rgb([31, 119, 180]);
const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);

/// 3x5 glyphs, rows top to bottom, 3 bits each (MSB left).
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'e' => [0, 7, 7, 4, 7],
        '%' => [5, 1, 2, 4, 5],
        _ => return None,
    })
}

/// Draws `text` with its top-left corner at (x, y), each font pixel 2x2.
fn text(img: &mut RgbImage, x: u32, y: u32, s: &str) {
    for (i, c) in s.chars().enumerate() {
        let Some(rows) = glyph(c) else { continue };
        for (r, bits) in rows.iter().enumerate() {
            for b in 0..3 {
                if bits & (4 >> b) != 0 {
                    for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        let (px, py) = (x + i as u32 * 8 + b * 2 + dx, y + r as u32 * 2 + dy);
                        if px < img.width() && py < img.height() {
                            img.put_pixel(px, py, Rgb([60, 60, 60]));
                        }
                    }
                }
            }
        }
    }
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), colour: Rgb<u8>) {
    let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        for (dx, dy) in [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0)] {
            let (px, py) = ((x + dx) as u32, (y + dy) as u32);
            if px < img.width() && py < img.height() {
                img.put_pixel(px, py, colour);
            }
        }
    }
}

fn label(v: f64, percent: bool) -> String {
    if percent {
        format!("{:.1}%", 100.0 * v)
    } else if v != 0.0 && (v.abs() < 1e-2 || v.abs() >= 1e4) {
        format!("{v:.1e}")
    } else {
        format!("{v:.3}")
    }
}

/// One panel at horizontal offset `x0`: every series over the epochs, on a shared y range.
fn panel(img: &mut RgbImage, x0: u32, series: &[(Vec<f64>, Rgb<u8>)], percent: bool) {
    let values = series.iter().flat_map(|(v, _)| v.iter().copied()).filter(|v| v.is_finite());
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return;
    }
    let (lo, hi) = if hi - lo < 1e-12 { (lo - 0.5 * lo.abs().max(1e-3), hi + 0.5 * hi.abs().max(1e-3)) } else { (lo, hi) };
    let (left, top, right, bottom) = (x0 + MARGIN, 18, x0 + W - 10, H - 24);
    for k in 0..=4 {
        let y = top + (bottom - top) * k / 4;
        line(img, (left as f64, y as f64), (right as f64, y as f64), GRID);
    }
    line(img, (left as f64, top as f64), (left as f64, bottom as f64), BLACK);
    line(img, (left as f64, bottom as f64), (right as f64, bottom as f64), BLACK);
    text(img, x0 + 2, top, &label(hi, percent));
    text(img, x0 + 2, bottom - 10, &label(lo, percent));
    let n = series.iter().map(|(v, _)| v.len()).max().unwrap_or(0);
    text(img, right - 16, bottom + 6, &n.to_string());
    text(img, left, bottom + 6, "1");
    let xs = |i: usize| left as f64 + (right - left) as f64 * if n > 1 { i as f64 / (n - 1) as f64 } else { 0.5 };
    let ys = |v: f64| bottom as f64 - (bottom - top) as f64 * (v - lo) / (hi - lo);
    for (v, colour) in series {
        for i in 1..v.len() {
            line(img, (xs(i - 1), ys(v[i - 1])), (xs(i), ys(v[i])), *colour);
        }
        for (i, &y) in v.iter().enumerate() {
            for d in 0..3 {
                line(img, (xs(i) - 1.0, ys(y) - 1.0 + d as f64), (xs(i) + 1.0, ys(y) - 1.0 + d as f64), *colour);
            }
        }
    }
}

/// Writes the loss, accuracy and learning-rate panels of `history`.
pub fn curves(path: &Path, history: &[EpochMetrics]) -> Result<()> {
    let mut img = RgbImage::from_pixel(3 * W, H, Rgb([255, 255, 255]));
    let get = |f: fn(&EpochMetrics) -> f64| history.iter().map(f).collect::<Vec<f64>>();
    panel(&mut img, 0, &[(get(|m| m.train_loss), RED), (get(|m| m.val_loss), BLUE)], false);
    panel(&mut img, W, &[(get(|m| m.train_accuracy), RED), (get(|m| m.val_accuracy), BLUE)], true);
    panel(&mut img, 2 * W, &[(get(|m| m.lr), BLACK)], false);
    Ok(xception::segment::write_png(path, &img)?)
}
