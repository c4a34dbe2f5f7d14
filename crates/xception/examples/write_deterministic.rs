//! Writes a timm-layout safetensors file of deterministic weights for a variant:
//! `write_deterministic MODEL OUT.safetensors`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        return Err("usage: write_deterministic MODEL OUT.safetensors".into());
    }
    let variant = xception::Variant::parse(&args[1])?;
    let net = xception::Network::build(&xception::ModelConfig::new(variant))?;
    xception::weights::deterministic(&net).write_safetensors(std::path::Path::new(&args[2]))?;
    Ok(())
}
