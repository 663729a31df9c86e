"""Install the secret CKKS context from base64 on standard input, without a staged copy.

argv: DEST USER GROUP MODE(octal) CHECK(0|1). Decodes in memory, writes a private temporary
file beside DEST and renames it over DEST only when the bytes differ. Prints "changed" or
"unchanged" (Ansible's changed_when reads it). Nothing but DEST is left on disk, even on error.
"""
import base64
import binascii
import grp
import os
import pwd
import sys
import tempfile


def main() -> int:
    dest, user, group, mode, check = sys.argv[1:6]
    try:
        new = base64.b64decode("".join(sys.stdin.read().split()), validate=True)
    except binascii.Error as exc:
        print(f"the secret context in the vault is not valid base64: {exc}", file=sys.stderr)
        return 2
    try:
        with open(dest, "rb") as fh:
            if fh.read() == new:
                print("unchanged")
                return 0
    except FileNotFoundError:
        pass
    if check == "1":
        print("changed")
        return 0
    os.umask(0o077)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".secret-ctx-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(new)
            fh.flush()
            os.fsync(fh.fileno())
        os.chown(tmp, pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid)
        os.chmod(tmp, int(mode, 8))
        os.replace(tmp, dest)
    except BaseException:
        os.unlink(tmp)
        raise
    print("changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
