//! The HTML export opened in a real browser (Debian's Chromium, headless): the page's
//! hazard markers, counted in the DOM the browser built, must equal the trace's
//! hazards, and a screenshot must show the timeline with its critical markers drawn.

use std::{path::Path, process::Command};

use anyhow::{ensure, Context as _, Result};

/// The critical markers' fill (#d62728).
const CRITICAL: [u8; 3] = [0xd6, 0x27, 0x28];

fn chromium(dir: &Path, args: &[&str]) -> Result<std::process::Output> {
    let profile = dir.join("chromium-profile");
    let _ = std::fs::remove_dir_all(&profile);
    // The flags keep a headless Chromium from reaching for the network at start.
    Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking"])
        .args(["--disable-component-update", "--disable-sync", "--hide-scrollbars"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .context("running chromium (Debian's chromium package: `cargo xtask setup` installs it)")
}

/// Opens `page` (an export of a trace with `hazards` hazards, `critical` of them
/// critical); returns what was seen.
pub fn check_page(page: &Path, hazards: usize, critical: usize) -> Result<String> {
    let dir = page.parent().context("the page has a directory")?;
    let url = format!("file://{}", page.canonicalize()?.display());
    let dom = chromium(dir, &["--dump-dom", &url])?;
    let dom_text = String::from_utf8_lossy(&dom.stdout);
    ensure!(dom.status.success() && dom_text.contains("</html>"), "chromium --dump-dom failed: {}", String::from_utf8_lossy(&dom.stderr));
    let markers = dom_text.matches("class=\"hazard\"").count();
    let rows = dom_text.matches("class=\"hazard-row\"").count();
    ensure!(markers == hazards && rows == hazards, "the page shows {markers} markers and {rows} table rows for the trace's {hazards} hazards");
    let shot = dir.join(format!("{}.png", page.file_stem().and_then(|s| s.to_str()).unwrap_or("page")));
    let _ = std::fs::remove_file(&shot);
    let out = chromium(dir, &[&format!("--screenshot={}", shot.display()), "--window-size=1280,900", &url])?;
    ensure!(shot.exists(), "no screenshot: {}", String::from_utf8_lossy(&out.stderr));
    let (w, h, red, colors) = pixels(&shot)?;
    ensure!(colors >= 8, "the screenshot is blank ({colors} colours)");
    if critical > 0 {
        ensure!(red >= 40, "the screenshot shows {red} pixels of the critical markers' colour for {critical} critical hazard(s)");
    }
    Ok(format!("{markers} markers and rows for {hazards} hazards in Chromium's DOM; screenshot {w}x{h} with {red} critical-marker pixels ({})", shot.display()))
}

/// (width, height, pixels of the critical colour, distinct colours up to 1000).
fn pixels(png_path: &Path) -> Result<(u32, u32, usize, usize)> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(png_path)?));
    let mut reader = decoder.read_info().context("reading the screenshot")?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).context("decoding the screenshot")?;
    let step = match info.color_type {
        png::ColorType::Rgba => 4,
        png::ColorType::Rgb => 3,
        other => anyhow::bail!("screenshot colour type {other:?}"),
    };
    let mut seen = std::collections::HashSet::new();
    let mut red = 0;
    for px in buf[..info.buffer_size()].chunks(step) {
        if px[..3] == CRITICAL {
            red += 1;
        }
        if seen.len() < 1000 {
            seen.insert([px[0], px[1], px[2]]);
        }
    }
    Ok((info.width, info.height, red, seen.len()))
}
