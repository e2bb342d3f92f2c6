"""usocksd: the SOCKS5/SOCKS4/SOCKS4a server at the edge, on transocks' pre-fork runtime.

Modules: settings (declared once), cli (the App and main), server (one client
connection), protocol (the wire format), acl (client subnets, destination
rules), outbound (resolve, check, connect), egress (source address pool),
dnsbl (blocklist checks of the pool), credentials (the user/password file).
"""
