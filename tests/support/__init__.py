"""What the tests share besides conftest.py: real servers and instances (Postfix, sendmail,
clamd, an SMTP peer, ispmailgate serve), keys and hostile messages built in memory, and the
parts the install step prepares (prepared.py).  The test filters, loaded by name as any
plug-in is, are in ../plugins/."""
