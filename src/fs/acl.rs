//! POSIX ACLs as the kernel hands them to a FUSE daemon that asked for FUSE_POSIX_ACL:
//! the `system.posix_acl_access` and `system.posix_acl_default` xattrs in the kernel's
//! binary form. The kernel checks permissions against them (it asks for the xattr); the
//! daemon keeps them, and does what an in-kernel filesystem's `set_acl`, `chmod` and
//! `create` would: keep the mode bits and the ACL in step, and give new nodes their
//! parent's default ACL (the rules of the kernel's fs/posix_acl.c).

/// The access ACL's xattr name.
pub const ACCESS: &[u8] = b"system.posix_acl_access";
/// A directory's default ACL (what new nodes in it inherit).
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
/// The id of the entries that name no one (owner, owning group, mask, other).
const UNDEFINED_ID: u32 = u32::MAX;
/// More entries than this is a hostile value (the kernel's own limit on an xattr is
/// 64 KiB, ~8,000 entries; ext4 takes a few hundred).
const MAX_ENTRIES: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

/// A parsed, validated ACL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl {
    entries: Vec<Entry>,
}

impl Acl {
    /// Parse and check an ACL xattr value. `Ok(None)`: an empty ACL (no entries), which
    /// removes the ACL. EINVAL for anything the kernel's `posix_acl_valid` would refuse.
    pub fn parse(value: &[u8]) -> Result<Option<Acl>, i32> {
        let (head, body) = value.split_at_checked(4).ok_or(libc::EINVAL)?;
        let version = u32::from_le_bytes(head.try_into().map_err(|_| libc::EINVAL)?);
        if version != VERSION || body.len() % 8 != 0 || body.len() / 8 > MAX_ENTRIES {
            return Err(libc::EINVAL);
        }
        let entries: Vec<Entry> = body
            .chunks_exact(8)
            .map(|e| Entry {
                tag: u16::from_le_bytes([e[0], e[1]]),
                perm: u16::from_le_bytes([e[2], e[3]]),
                id: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            })
            .collect();
        if entries.is_empty() {
            return Ok(None);
        }
        let acl = Acl { entries };
        acl.check()?;
        Ok(Some(acl))
    }

    /// The kernel's rules: one owner, one owning group and one other entry; named
    /// users, then named groups, each sorted by id without repeats; a mask if (and only
    /// if) there are named entries; permissions within rwx.
    fn check(&self) -> Result<(), i32> {
        // Tags must appear in this order; named ones may repeat with rising ids.
        const ORDER: [u16; 6] = [USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER];
        let mut at = 0;
        let mut last_id: Option<u32> = None;
        let mut seen = [0usize; 6];
        for e in &self.entries {
            if e.perm & !7 != 0 {
                return Err(libc::EINVAL);
            }
            let pos = ORDER.iter().position(|&t| t == e.tag).ok_or(libc::EINVAL)?;
            if pos < at {
                return Err(libc::EINVAL);
            }
            if pos > at {
                last_id = None;
            }
            at = pos;
            seen[pos] += 1;
            match e.tag {
                USER | GROUP => {
                    if last_id.is_some_and(|l| e.id <= l) {
                        return Err(libc::EINVAL);
                    }
                    last_id = Some(e.id);
                }
                _ if seen[pos] > 1 => return Err(libc::EINVAL),
                _ => {}
            }
        }
        let named = seen[1] + seen[3];
        let base = seen[0] == 1 && seen[2] == 1 && seen[5] == 1;
        let mask_ok = if named > 0 {
            seen[4] == 1
        } else {
            seen[4] <= 1
        };
        if base && mask_ok {
            Ok(())
        } else {
            Err(libc::EINVAL)
        }
    }

    /// The xattr value (entries of owner, mask, owning group and other written with the
    /// undefined id, as the kernel writes them).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 8 * self.entries.len());
        out.extend_from_slice(&VERSION.to_le_bytes());
        for e in &self.entries {
            let id = if matches!(e.tag, USER | GROUP) {
                e.id
            } else {
                UNDEFINED_ID
            };
            out.extend_from_slice(&e.tag.to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    /// Whether the mode bits say all the ACL says (owner, group and other only): such an
    /// access ACL is not stored, as on ext4.
    pub fn is_minimal(&self) -> bool {
        self.entries
            .iter()
            .all(|e| matches!(e.tag, USER_OBJ | GROUP_OBJ | OTHER))
    }

    /// The rwx bits of the mode this ACL implies: the group bits are the mask's when
    /// there is one (`posix_acl_equiv_mode`).
    pub fn mode_bits(&self) -> u16 {
        let mut mode = 0;
        let mut mask = None;
        for e in &self.entries {
            match e.tag {
                USER_OBJ => mode |= e.perm << 6,
                GROUP_OBJ => mode |= e.perm << 3,
                OTHER => mode |= e.perm,
                MASK => mask = Some(e.perm),
                _ => {}
            }
        }
        match mask {
            Some(m) => (mode & !0o070) | (m << 3),
            None => mode,
        }
    }

    /// A chmod to `perm`: owner, other and the mask (the owning group without a mask)
    /// take the new bits (`posix_acl_chmod`).
    pub fn chmod(&mut self, perm: u16) {
        let has_mask = self.entries.iter().any(|e| e.tag == MASK);
        for e in &mut self.entries {
            match e.tag {
                USER_OBJ => e.perm = (perm >> 6) & 7,
                OTHER => e.perm = perm & 7,
                MASK => e.perm = (perm >> 3) & 7,
                GROUP_OBJ if !has_mask => e.perm = (perm >> 3) & 7,
                _ => {}
            }
        }
    }

    /// A new node's access ACL from its parent's default ACL (`self`) and the mode the
    /// creator asked for (no umask: a default ACL replaces it). Both are narrowed to
    /// what each allows (`posix_acl_create_masq`); returns the node's new permission
    /// bits (setuid, setgid and sticky kept from `perm`).
    pub fn create_masq(&mut self, perm: u16) -> u16 {
        let mut mode = perm;
        let has_mask = self.entries.iter().any(|e| e.tag == MASK);
        for e in &mut self.entries {
            match e.tag {
                USER_OBJ => {
                    e.perm &= (mode >> 6) & 7;
                    mode &= (e.perm << 6) | !0o700;
                }
                OTHER => {
                    e.perm &= mode & 7;
                    mode &= e.perm | !0o007;
                }
                MASK | GROUP_OBJ if (e.tag == MASK) == has_mask => {
                    e.perm &= (mode >> 3) & 7;
                    mode &= (e.perm << 3) | !0o070;
                }
                _ => {}
            }
        }
        mode
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = VERSION.to_le_bytes().to_vec();
        for &(tag, perm, id) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    const U: u32 = UNDEFINED_ID;

    #[test]
    fn parses_checks_and_writes_back() {
        let v = acl(&[
            (USER_OBJ, 7, U),
            (USER, 5, 1000),
            (USER, 4, 1001),
            (GROUP_OBJ, 5, U),
            (GROUP, 6, 50),
            (MASK, 7, U),
            (OTHER, 0, U),
        ]);
        let a = Acl::parse(&v).expect("valid").expect("entries");
        assert_eq!(a.to_bytes(), v);
        assert!(!a.is_minimal());
        assert_eq!(a.mode_bits(), 0o770);
        assert_eq!(Acl::parse(&acl(&[])), Ok(None));

        let bad: &[&[(u16, u16, u32)]] = &[
            // No mask with named entries.
            &[
                (USER_OBJ, 7, U),
                (USER, 5, 1),
                (GROUP_OBJ, 5, U),
                (OTHER, 0, U),
            ],
            // Named users out of order, or repeated.
            &[
                (USER_OBJ, 7, U),
                (USER, 5, 2),
                (USER, 5, 1),
                (GROUP_OBJ, 5, U),
                (MASK, 7, U),
                (OTHER, 0, U),
            ],
            &[
                (USER_OBJ, 7, U),
                (USER, 5, 1),
                (USER, 5, 1),
                (GROUP_OBJ, 5, U),
                (MASK, 7, U),
                (OTHER, 0, U),
            ],
            // Tags out of order, missing, repeated, unknown; permission bits beyond rwx.
            &[(GROUP_OBJ, 5, U), (USER_OBJ, 7, U), (OTHER, 0, U)],
            &[(USER_OBJ, 7, U), (OTHER, 0, U)],
            &[
                (USER_OBJ, 7, U),
                (USER_OBJ, 7, U),
                (GROUP_OBJ, 5, U),
                (OTHER, 0, U),
            ],
            &[
                (USER_OBJ, 7, U),
                (0x40, 7, U),
                (GROUP_OBJ, 5, U),
                (OTHER, 0, U),
            ],
            &[(USER_OBJ, 8, U), (GROUP_OBJ, 5, U), (OTHER, 0, U)],
        ];
        for b in bad {
            assert_eq!(Acl::parse(&acl(b)), Err(libc::EINVAL), "{b:?}");
        }
        let minimal = acl(&[(USER_OBJ, 6, U), (GROUP_OBJ, 4, U), (OTHER, 4, U)]);
        assert!(Acl::parse(&minimal).unwrap().unwrap().is_minimal());
        // Wrong version, ragged length, too short.
        let mut v1 = minimal.clone();
        v1[0] = 1;
        for v in [v1, minimal[..minimal.len() - 1].to_vec(), vec![2, 0]] {
            assert_eq!(Acl::parse(&v), Err(libc::EINVAL));
        }
    }

    #[test]
    fn chmod_and_create_follow_the_kernel() {
        let mut a = Acl::parse(&acl(&[
            (USER_OBJ, 7, U),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, U),
            (MASK, 7, U),
            (OTHER, 5, U),
        ]))
        .unwrap()
        .unwrap();
        // A new file asked for 0666: the default ACL's execute bits go, the mask
        // becomes rw-, and the mode is what the ACL now says.
        let mut file = a.clone();
        assert_eq!(file.create_masq(0o666), 0o664);
        assert_eq!(file.mode_bits(), 0o664);
        // The owning group entry stays as the default had it (the mask limits it).
        assert!(file.entries.contains(&Entry {
            tag: GROUP_OBJ,
            perm: 5,
            id: U
        }));
        // setgid is kept.
        assert_eq!(a.clone().create_masq(0o2777), 0o2775);
        // chmod 640 sets owner, mask and other; the named user keeps rwx under mask r--.
        a.chmod(0o640);
        assert_eq!(a.mode_bits(), 0o640);
        assert!(a.entries.contains(&Entry {
            tag: USER,
            perm: 7,
            id: 1000
        }));
        assert!(a.entries.contains(&Entry {
            tag: MASK,
            perm: 4,
            id: U
        }));
        // Without a mask, chmod and create act on the owning group.
        let mut m = Acl::parse(&acl(&[(USER_OBJ, 7, U), (GROUP_OBJ, 7, U), (OTHER, 7, U)]))
            .unwrap()
            .unwrap();
        assert_eq!(m.clone().create_masq(0o750), 0o750);
        m.chmod(0o604);
        assert_eq!(m.mode_bits(), 0o604);
    }
}
