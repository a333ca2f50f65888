# With CERTROTATE_FIOCONFIG_TAKEOVER = "1" the certrotate package owns the
# renew-client-cert handler (fioctl rotate-certs names it): fioconfig's own
# goes. Off, this append adds nothing, so fioconfig's signatures stay as they are.
require ${@'fioconfig-certrotate-takeover.inc' if d.getVar('CERTROTATE_FIOCONFIG_TAKEOVER') == '1' else ''}
