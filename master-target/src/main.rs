fn main() {
    std::process::exit(master_target::cli::main_with(std::env::args_os()));
}
