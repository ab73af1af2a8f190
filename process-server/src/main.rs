fn main() {
    std::process::exit(process_server::cli::main_with(std::env::args_os()));
}
