PUSHDIVERT(-1)
#
# ispmailgate as a sendmail mailer: the seed's examples/ispmailgate.m4, for today.
#
# Copy this file into the cf/mailer directory of sendmail's m4 files (Debian:
# /usr/share/sendmail/cf/mailer/) and add it to the .mc file of the instance that
# faces the world, after the smtp mailer, as sendmail.mc beside this file does.  (No
# macro is named in these comments: sendmail's m4 set-up expands even comments.)
# Route domains to it in that instance's mailertable:
#
#	example.com	ispmailgate:localhost
#
# Settings, each with a default:
#	ISPMAILGATE_MAILER_PATH		/usr/local/bin/ispmailgate
#	ISPMAILGATE_MAILER_ARGS		ispmailgate -f $g -- $u
#	ISPMAILGATE_MAILER_FLAGS	DFMmnu8
#	ISPMAILGATE_MAILER_MAX		(no limit)	largest message handed over
#	ISPMAILGATE_MAILER_USER		(sendmail's DefaultUser)
#
# Flags: m hands all recipients of a message over in one call ($u is repeated), so
# ispmailgate runs each filter step once for all of them; n: no From_ line (the sender
# comes with -f); u keeps upper case in local parts; 8 passes 8-bit bodies as they
# are (no MIME 8->7 conversion: DKIM signatures survive); D, F, M as for any local
# mailer.  "--" keeps a recipient that starts with "-" a recipient.  sendmail queues
# the message on exit 75 (EX_TEMPFAIL) and bounces it on 69 (EX_UNAVAILABLE).
#
ifdef(`ISPMAILGATE_MAILER_PATH',,
	`define(`ISPMAILGATE_MAILER_PATH', `/usr/local/bin/ispmailgate')')
ifdef(`ISPMAILGATE_MAILER_ARGS',,
	`define(`ISPMAILGATE_MAILER_ARGS', `ispmailgate -f $g -- $u')')
_DEFIFNOT(`ISPMAILGATE_MAILER_FLAGS', `DFMmnu8')
POPDIVERT

######################*****##############
###  ISPMAILGATE Mailer specification  ###
##################*****##################

VERSIONID(`ispmailgate.m4 2.0')

Mispmailgate,	P=ISPMAILGATE_MAILER_PATH, F=ISPMAILGATE_MAILER_FLAGS, S=EnvFromSMTP/HdrFromSMTP, R=EnvToSMTP/HdrFromSMTP,
		ifdef(`ISPMAILGATE_MAILER_MAX', `M=ISPMAILGATE_MAILER_MAX, ')ifdef(`ISPMAILGATE_MAILER_USER', `U=ISPMAILGATE_MAILER_USER, ')T=DNS/RFC822/X-Unix,
		A=ISPMAILGATE_MAILER_ARGS
