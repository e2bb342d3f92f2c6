"""vsftpd in the inet namespace: the server that shows why `sticky` is the default balance.

With `pasv_promiscuous=NO` (vsftpd's default, stated here) a passive-mode data
connection must come from the address of its control connection, or vsftpd
answers "425 Security: Bad IP connecting."  Anonymous read-only downloads from
a directory the test fills.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping

from .netns import INET_V4, Lab
from .services import Service, _spawn, wait_listening

PASV_PORTS = (30000, 30099)


def start_vsftpd(lab: Lab, files: Mapping[str, bytes], host: str = INET_V4, port: int = 21) -> Service:
    """vsftpd on host:port serving `files` (name -> content) to anonymous users."""
    if shutil.which("vsftpd") is None:
        raise FileNotFoundError("vsftpd is not installed")
    workdir = lab.tempdir("vsftpd")
    root = workdir / "pub"
    root.mkdir()
    root.chmod(0o555)
    for name, data in files.items():
        (root / name).write_bytes(data)
        (root / name).chmod(0o444)
    empty = workdir / "empty"
    empty.mkdir()
    empty.chmod(0o555)
    conf = workdir / "vsftpd.conf"
    conf.write_text(f"""\
listen=YES
listen_ipv6=NO
listen_address={host}
listen_port={port}
background=NO
anonymous_enable=YES
local_enable=NO
write_enable=NO
anon_root={root}
no_anon_password=YES
pasv_enable=YES
pasv_promiscuous=NO
pasv_min_port={PASV_PORTS[0]}
pasv_max_port={PASV_PORTS[1]}
port_enable=NO
secure_chroot_dir={empty}
seccomp_sandbox=NO
isolate_network=NO
use_localtime=NO
xferlog_enable=YES
vsftpd_log_file={workdir / 'vsftpd.log'}
log_ftp_protocol=YES
dual_log_enable=YES
xferlog_file={workdir / 'xfer.log'}
""")
    svc = Service("vsftpd", lab.inet, port, workdir)
    for name in ("vsftpd.log", "xfer.log"):
        (workdir / name).touch()
        svc.log_paths.append(workdir / name)
    _spawn(lab, svc, ["vsftpd", str(conf)], "vsftpd.stderr")
    wait_listening(lab, svc)
    return svc
