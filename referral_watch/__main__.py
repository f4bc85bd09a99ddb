from referral_watch.cli import main

main()
