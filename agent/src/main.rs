fn main() {
    std::process::exit(agent::cli::main_with(std::env::args_os()));
}
