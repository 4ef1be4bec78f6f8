//! The ztunnel binary is linked with `code-order.ld` (`build.rs`): the functions that
//! start-up and the data path run are gathered in `.text.ambit_order` at the front
//! of the code, so an idle ztunnel has few code pages resident. This reads the
//! binary Cargo built for these tests (ELF section and symbol tables) and checks
//! that the layout took: the section is there, holds a good part of the code, and
//! holds functions start-up runs.
#![cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))] // build.rs
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

const ORDER_SECTION: &str = ".text.ambit_order";

/// Little-endian fields of an ELF64 file.
struct Elf<'a>(&'a [u8]);

struct Section {
    name: String,
    kind: u32,
    offset: usize,
    size: usize,
    link: usize,
}

impl Elf<'_> {
    fn u16(&self, at: usize) -> usize {
        usize::from(u16::from_le_bytes(self.0[at..at + 2].try_into().unwrap()))
    }
    fn u32(&self, at: usize) -> usize {
        usize::try_from(u32::from_le_bytes(self.0[at..at + 4].try_into().unwrap())).unwrap()
    }
    fn u64(&self, at: usize) -> usize {
        usize::try_from(u64::from_le_bytes(self.0[at..at + 8].try_into().unwrap())).unwrap()
    }
    fn c_str(&self, at: usize) -> String {
        let end = self.0[at..].iter().position(|&b| b == 0).unwrap();
        String::from_utf8_lossy(&self.0[at..at + end]).into_owned()
    }

    fn sections(&self) -> Vec<Section> {
        assert_eq!(&self.0[..4], b"\x7fELF", "not an ELF file");
        assert_eq!(self.0[4], 2, "not ELF64");
        let (shoff, shentsize, shnum, shstrndx) = (
            self.u64(0x28),
            self.u16(0x3a),
            self.u16(0x3c),
            self.u16(0x3e),
        );
        let header = |i: usize| shoff + i * shentsize;
        let names = self.u64(header(shstrndx) + 0x18);
        (0..shnum)
            .map(|i| {
                let h = header(i);
                Section {
                    name: self.c_str(names + self.u32(h)),
                    kind: u32::try_from(self.u32(h + 4)).unwrap(),
                    offset: self.u64(h + 0x18),
                    size: self.u64(h + 0x20),
                    link: self.u32(h + 0x28),
                }
            })
            .collect()
    }

    /// Each symbol's name and the index of the section it is defined in.
    fn symbols(&self, sections: &[Section]) -> Vec<(String, usize)> {
        const SHT_SYMTAB: u32 = 2;
        let symtab = sections
            .iter()
            .find(|s| s.kind == SHT_SYMTAB)
            .expect("the binary has a symbol table");
        let strings = sections[symtab.link].offset;
        (0..symtab.size / 24)
            .map(|i| symtab.offset + i * 24)
            .map(|sym| (self.c_str(strings + self.u32(sym)), self.u16(sym + 6)))
            .collect()
    }
}

#[test]
fn start_up_code_is_gathered_at_the_front_of_the_binary() {
    if option_env!("AMBIT_DEFAULT_CODE_LAYOUT").is_some() {
        eprintln!(
            "SKIPPED: built with AMBIT_DEFAULT_CODE_LAYOUT (build.rs links without code-order.ld)"
        );
        return;
    }
    let bytes = std::fs::read(env!("CARGO_BIN_EXE_ztunnel")).unwrap();
    let elf = Elf(&bytes);
    let sections = elf.sections();
    let (index, order) = sections
        .iter()
        .enumerate()
        .find(|(_, s)| s.name == ORDER_SECTION)
        .unwrap_or_else(|| panic!("no {ORDER_SECTION} section: code-order.ld was not applied"));
    let text = sections.iter().find(|s| s.name == ".text").unwrap();
    assert!(
        order.offset < text.offset,
        "{ORDER_SECTION} comes before .text"
    );
    // The profile's functions, found by name without their per-build hashes: in a
    // release build more than half of the code, in a test build less (more,
    // smaller functions), never a sliver. (Whether the exact symbols of
    // code-order.txt still match a release build is the idle-memory benchmark's
    // to tell: a test build's hashes differ from the release build's anyway.)
    assert!(
        order.size > 512 * 1024,
        "{ORDER_SECTION} holds only {} bytes: the patterns of code-order.ld no longer match this build",
        order.size
    );

    let symbols = elf.symbols(&sections);
    // Rust symbols end in a per-build hash: the names below that end in `17h`
    // are prefixes, the others exact.
    let section_of = |want: &str| {
        symbols
            .iter()
            .find(|(name, _)| {
                if want.ends_with("17h") {
                    name.starts_with(want)
                } else {
                    name == want
                }
            })
            .map(|(_, section)| *section)
    };
    for (what, prefix) in [
        ("the program's main", "main"),
        ("glibc's start-up", "__libc_start_main"),
        (
            "the command line's parser",
            "_ZN70_$LT$ztunnel..config..Config$u20$as$u20$clap_builder..derive..Args$GT$12augment_args17h",
        ),
    ] {
        assert_eq!(
            section_of(prefix),
            Some(index),
            "{what} ({prefix}) is not in {ORDER_SECTION}"
        );
    }
    // What the profile never ran (no connection was refused in it) stays where the
    // linker puts it by default.
    let never_run = "_ZN7ztunnel3why6WhyLog6record17h";
    let section = section_of(never_run).expect("ztunnel::why::WhyLog::record is in the binary");
    assert_ne!(
        section, index,
        "{never_run}... has no reason to be in {ORDER_SECTION}"
    );
}
