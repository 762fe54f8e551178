//! The multicall entry point: see `applets::dispatch`.

fn main() {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    std::process::exit(miio_client::applets::dispatch(&args));
}
