fn main() { xception::hello(); }
